//! Content digests as the OCI image spec defines them: `algorithm ":" encoded`.
//!
//! Only `sha256` and `sha512` are accepted; both are registered algorithms of the
//! image spec and the only ones registries are asked to support. Encoded parts must
//! be lowercase hex of the exact length, so that one piece of content has exactly one
//! spelling and can safely name a file.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A digest algorithm sluice understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The name used in digest strings and storage paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex-encoded digest.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// A fresh streaming hasher for this algorithm.
    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a digest sluice accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} has no ':' between algorithm and encoded part")]
    MissingSeparator(String),
    #[error("digest algorithm {0:?} is not supported (sha256 and sha512 are)")]
    UnsupportedAlgorithm(String),
    #[error("digest {digest:?}: {algorithm} needs {expected} lowercase hex characters")]
    BadEncoding {
        digest: String,
        algorithm: Algorithm,
        expected: usize,
    },
}

/// A validated content digest, held as raw bytes: a layer index holds one per
/// chunk, and hex strings on the heap would triple what each one costs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(Bytes);

/// Variant order = [`Algorithm`] order, and byte order = hex order, so digests
/// sort as their strings do.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Bytes {
    Sha256([u8; 32]),
    Sha512(Box<[u8; 64]>),
}

impl Digest {
    /// Builds a digest from an algorithm and hex string, validating both.
    pub fn new(algorithm: Algorithm, hex: &str) -> Result<Self, DigestError> {
        // One pass that decodes and refuses anything but lowercase hex (a
        // layer's TOC holds a digest per chunk: tens of thousands per pull),
        // through a table and without a branch per character: a bad
        // character sets a high bit, checked once at the end.
        const NIBBLE: [u8; 256] = {
            let mut t = [0xff; 256];
            let mut c = 0;
            while c < 10 {
                t[b'0' as usize + c] = c as u8;
                c += 1;
            }
            let mut c = 0;
            while c < 6 {
                t[b'a' as usize + c] = 10 + c as u8;
                c += 1;
            }
            t
        };
        let mut raw = [0u8; 64];
        let raw = &mut raw[..algorithm.hex_len() / 2];
        let decoded = hex.len() == algorithm.hex_len() && {
            let mut bad = 0u8;
            for (pair, out) in hex.as_bytes().chunks_exact(2).zip(raw.iter_mut()) {
                let (h, l) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
                bad |= h | l;
                *out = h << 4 | l;
            }
            bad & 0xf0 == 0
        };
        if !decoded {
            return Err(DigestError::BadEncoding {
                digest: format!("{algorithm}:{hex}"),
                algorithm,
                expected: algorithm.hex_len(),
            });
        }
        Ok(Self::from_raw(algorithm, raw))
    }

    /// `raw` has the algorithm's output length (checked by the callers).
    fn from_raw(algorithm: Algorithm, raw: &[u8]) -> Self {
        Digest(match algorithm {
            Algorithm::Sha256 => Bytes::Sha256(raw.try_into().expect("32 bytes")),
            Algorithm::Sha512 => Bytes::Sha512(Box::new(raw.try_into().expect("64 bytes"))),
        })
    }

    /// Digest of a byte slice held in memory.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut h = algorithm.hasher();
        h.update(data);
        h.finish()
    }

    /// SHA-256 digest of a byte slice, the common case.
    pub fn sha256(data: &[u8]) -> Self {
        Self::of(Algorithm::Sha256, data)
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.0 {
            Bytes::Sha256(_) => Algorithm::Sha256,
            Bytes::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Bytes::Sha256(b) => b,
            Bytes::Sha512(b) => &b[..],
        }
    }

    /// The lowercase hex encoded part.
    pub fn hex(&self) -> String {
        hex::encode(self.as_bytes())
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::MissingSeparator(s.to_owned()))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(DigestError::UnsupportedAlgorithm(other.to_owned())),
        };
        Digest::new(algorithm, hex)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A streaming hasher for either supported algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::from_raw(Algorithm::Sha256, &h.finalize()),
            Hasher::Sha512(h) => Digest::from_raw(Algorithm::Sha512, &h.finalize()),
        }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_algorithms() {
        let d256 = Digest::sha256(b"");
        assert_eq!(
            d256.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d256.to_string().parse::<Digest>().unwrap(), d256);
        let d512 = Digest::of(Algorithm::Sha512, b"abc");
        assert!(d512.to_string().starts_with("sha512:ddaf35a1"));
        assert_eq!(d512.to_string().parse::<Digest>().unwrap(), d512);
    }

    #[test]
    fn orders_as_the_strings_do() {
        let mut digests: Vec<Digest> = (0u8..50)
            .map(|i| {
                Digest::of(
                    if i % 3 == 0 {
                        Algorithm::Sha512
                    } else {
                        Algorithm::Sha256
                    },
                    &[i],
                )
            })
            .collect();
        let mut strings: Vec<String> = digests.iter().map(Digest::to_string).collect();
        digests.sort();
        strings.sort();
        assert_eq!(
            digests.iter().map(Digest::to_string).collect::<Vec<_>>(),
            strings
        );
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:abc",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000000000",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
            // 64 bytes, but not 64 hex digits.
            "sha256:éééééééééééééééééééééééééééééééé",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_character_but_lowercase_hex_is_refused_anywhere() {
        let good = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        for c in 0..=255u8 {
            let is_hex = c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
            for at in [0, 31, 63] {
                let mut hex = good.as_bytes().to_vec();
                hex[at] = c;
                let Ok(hex) = String::from_utf8(hex) else {
                    // Not a str: serde and parse never get here.
                    continue;
                };
                let parsed = Digest::new(Algorithm::Sha256, &hex);
                assert_eq!(parsed.is_ok(), is_hex, "{c:#x} at {at}");
                if let Ok(d) = parsed {
                    assert_eq!(d.to_string(), format!("sha256:{hex}"));
                }
            }
        }
    }

    #[test]
    fn streaming_equals_one_shot() {
        let mut h = Algorithm::Sha512.hasher();
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(h.finish(), Digest::of(Algorithm::Sha512, b"abc"));
    }
}
