//! Locating the TOC and tar-split: the 72-byte footer at the end of the blob,
//! or the layer descriptor's annotations (which also carry the TOC digest, and
//! so are what makes a partial pull trustworthy).

use std::collections::BTreeMap;

use super::{annotation, MANIFEST_CHECKSUM, MANIFEST_POSITION, TARSPLIT_POSITION};
use crate::Digest;

/// zstd skippable frame magic used by zstd:chunked (`0x184D2A50`, little endian).
pub const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
/// The footer's trailing magic.
pub const FOOTER_MAGIC: [u8; 8] = *b"GNUlInUx";
/// Footer content size; with the skippable frame header it is 72 bytes.
pub const FOOTER_CONTENT_LEN: usize = 64;
pub const FOOTER_LEN: usize = FOOTER_CONTENT_LEN + 8;
/// The footer of layers written before tar-split was added (containers/storage
/// < 1.43, e.g. Debian 12's skopeo 1.9): 40 bytes of content, no tar-split,
/// and a magic of different case.
pub const LEGACY_FOOTER_MAGIC: [u8; 8] = *b"GnUlInUx";
pub const LEGACY_FOOTER_CONTENT_LEN: usize = 40;
pub const LEGACY_FOOTER_LEN: usize = LEGACY_FOOTER_CONTENT_LEN + 8;
/// The only TOC type (the CRFS-style JSON manifest).
pub const MANIFEST_TYPE_CRFS: u64 = 1;

/// Where a metadata frame's zstd data lies in the blob (after the skippable
/// frame header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataLocation {
    pub offset: u64,
    pub compressed_len: u64,
    pub uncompressed_len: u64,
}

impl MetadataLocation {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.compressed_len)
    }
}

/// The locations the footer (or the annotations) give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub toc: MetadataLocation,
    pub tarsplit: Option<MetadataLocation>,
    /// Digest of the compressed TOC; only the annotations carry it.
    pub toc_digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FooterError {
    #[error(
        "blob does not end with a zstd:chunked footer (need {FOOTER_LEN} bytes ending in GNUlInUx)"
    )]
    NoFooter,
    #[error("zstd:chunked footer declares TOC type {0}; only type 1 is known")]
    TocType(u64),
    #[error("annotation {key}={value:?} is not {expected}")]
    Annotation {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

fn le(bytes: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

impl Footer {
    /// Parses the footer from the last bytes of a blob (any suffix of at least
    /// [`FOOTER_LEN`] bytes).
    pub fn from_suffix(suffix: &[u8]) -> Result<Self, FooterError> {
        if let Some(legacy) = Self::legacy_from_suffix(suffix) {
            return legacy;
        }
        if suffix.len() < FOOTER_LEN {
            return Err(FooterError::NoFooter);
        }
        let f = &suffix[suffix.len() - FOOTER_LEN..];
        if f[..4] != SKIPPABLE_MAGIC
            || f[4..8] != (FOOTER_CONTENT_LEN as u32).to_le_bytes()
            || f[FOOTER_LEN - 8..] != FOOTER_MAGIC
        {
            return Err(FooterError::NoFooter);
        }
        let c = &f[8..];
        let kind = le(c, 3);
        if kind != MANIFEST_TYPE_CRFS {
            return Err(FooterError::TocType(kind));
        }
        let tarsplit = MetadataLocation {
            offset: le(c, 4),
            compressed_len: le(c, 5),
            uncompressed_len: le(c, 6),
        };
        Ok(Footer {
            toc: MetadataLocation {
                offset: le(c, 0),
                compressed_len: le(c, 1),
                uncompressed_len: le(c, 2),
            },
            tarsplit: (tarsplit.compressed_len > 0).then_some(tarsplit),
            toc_digest: None,
        })
    }

    fn legacy_from_suffix(suffix: &[u8]) -> Option<Result<Self, FooterError>> {
        let f = suffix.get(suffix.len().checked_sub(LEGACY_FOOTER_LEN)?..)?;
        if f[..4] != SKIPPABLE_MAGIC
            || f[4..8] != (LEGACY_FOOTER_CONTENT_LEN as u32).to_le_bytes()
            || f[LEGACY_FOOTER_LEN - 8..] != LEGACY_FOOTER_MAGIC
        {
            return None;
        }
        let c = &f[8..];
        let kind = le(c, 3);
        if kind != MANIFEST_TYPE_CRFS {
            return Some(Err(FooterError::TocType(kind)));
        }
        Some(Ok(Footer {
            toc: MetadataLocation {
                offset: le(c, 0),
                compressed_len: le(c, 1),
                uncompressed_len: le(c, 2),
            },
            tarsplit: None,
            toc_digest: None,
        }))
    }

    /// The 72 footer bytes.
    pub fn to_bytes(&self) -> [u8; FOOTER_LEN] {
        let mut out = [0u8; FOOTER_LEN];
        out[..4].copy_from_slice(&SKIPPABLE_MAGIC);
        out[4..8].copy_from_slice(&(FOOTER_CONTENT_LEN as u32).to_le_bytes());
        let ts = self.tarsplit.unwrap_or(MetadataLocation {
            offset: 0,
            compressed_len: 0,
            uncompressed_len: 0,
        });
        let fields = [
            self.toc.offset,
            self.toc.compressed_len,
            self.toc.uncompressed_len,
            MANIFEST_TYPE_CRFS,
            ts.offset,
            ts.compressed_len,
            ts.uncompressed_len,
        ];
        for (i, v) in fields.iter().enumerate() {
            out[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        out[FOOTER_LEN - 8..].copy_from_slice(&FOOTER_MAGIC);
        out
    }

    /// Reads the locations from a layer descriptor's annotations (current or
    /// legacy key names). `Ok(None)` if the layer is not zstd:chunked.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<Self>, FooterError> {
        let Some(position) = annotation(annotations, MANIFEST_POSITION) else {
            return Ok(None);
        };
        let bad = |key, value: &str, expected| FooterError::Annotation {
            key,
            value: value.to_owned(),
            expected,
        };
        let nums = |s: &str| -> Option<Vec<u64>> { s.split(':').map(|p| p.parse().ok()).collect() };
        let toc = match nums(position).as_deref() {
            Some(&[offset, compressed_len, uncompressed_len, kind]) => {
                if kind != MANIFEST_TYPE_CRFS {
                    return Err(FooterError::TocType(kind));
                }
                MetadataLocation {
                    offset,
                    compressed_len,
                    uncompressed_len,
                }
            }
            _ => {
                return Err(bad(
                    MANIFEST_POSITION,
                    position,
                    "offset:length:uncompressed-length:type",
                ))
            }
        };
        let tarsplit = match annotation(annotations, TARSPLIT_POSITION) {
            None => None,
            Some(v) => match nums(v).as_deref() {
                Some(&[offset, compressed_len, uncompressed_len]) => Some(MetadataLocation {
                    offset,
                    compressed_len,
                    uncompressed_len,
                }),
                _ => {
                    return Err(bad(
                        TARSPLIT_POSITION,
                        v,
                        "offset:length:uncompressed-length",
                    ))
                }
            },
        };
        let toc_digest = match annotation(annotations, MANIFEST_CHECKSUM) {
            None => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| bad(MANIFEST_CHECKSUM, v, "a sha256 or sha512 digest"))?,
            ),
        };
        Ok(Some(Footer {
            toc,
            tarsplit,
            toc_digest,
        }))
    }

    /// The annotations a layer descriptor carries for this footer.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert(
            MANIFEST_POSITION.to_owned(),
            format!(
                "{}:{}:{}:{MANIFEST_TYPE_CRFS}",
                self.toc.offset, self.toc.compressed_len, self.toc.uncompressed_len
            ),
        );
        if let Some(d) = &self.toc_digest {
            a.insert(MANIFEST_CHECKSUM.to_owned(), d.to_string());
        }
        if let Some(ts) = &self.tarsplit {
            a.insert(
                TARSPLIT_POSITION.to_owned(),
                format!(
                    "{}:{}:{}",
                    ts.offset, ts.compressed_len, ts.uncompressed_len
                ),
            );
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_round_trip_and_annotations() {
        let f = Footer {
            toc: MetadataLocation {
                offset: 107123052,
                compressed_len: 1009822,
                uncompressed_len: 5525223,
            },
            tarsplit: Some(MetadataLocation {
                offset: 108132882,
                compressed_len: 612322,
                uncompressed_len: 15402870,
            }),
            toc_digest: None,
        };
        let bytes = f.to_bytes();
        assert_eq!(&bytes[..8], &[0x50, 0x2a, 0x4d, 0x18, 0x40, 0, 0, 0]);
        let mut blob = vec![7u8; 100];
        blob.extend_from_slice(&bytes);
        assert_eq!(Footer::from_suffix(&blob).unwrap(), f);
        assert_eq!(
            Footer::from_suffix(&blob[..blob.len() - 1]),
            Err(FooterError::NoFooter)
        );

        let mut a = f.annotations();
        assert_eq!(a[MANIFEST_POSITION], "107123052:1009822:5525223:1");
        assert_eq!(Footer::from_annotations(&a).unwrap().unwrap(), f);
        // Legacy names are accepted too.
        let legacy: BTreeMap<String, String> = a
            .iter()
            .map(|(k, v)| {
                (
                    k.replace("io.github.containers.", "io.containers."),
                    v.clone(),
                )
            })
            .collect();
        assert_eq!(Footer::from_annotations(&legacy).unwrap().unwrap(), f);
        a.insert(MANIFEST_POSITION.into(), "1:2:3".into());
        assert!(Footer::from_annotations(&a).is_err());
        a.insert(MANIFEST_POSITION.into(), "1:2:3:2".into());
        assert_eq!(Footer::from_annotations(&a), Err(FooterError::TocType(2)));
        assert_eq!(Footer::from_annotations(&BTreeMap::new()), Ok(None));

        // The 48-byte footer of older writers (skopeo 1.9).
        let mut legacy = vec![0x50, 0x2a, 0x4d, 0x18, 40, 0, 0, 0];
        for v in [1059992u64, 2462, 10584, 1] {
            legacy.extend_from_slice(&v.to_le_bytes());
        }
        legacy.extend_from_slice(b"GnUlInUx");
        let f = Footer::from_suffix(&legacy).unwrap();
        assert_eq!(f.toc.offset, 1059992);
        assert_eq!(f.toc.compressed_len, 2462);
        assert_eq!(f.tarsplit, None);
    }
}
