//! Smoke mode of the fuzz targets (see `fuzz/`): thousands of deterministic
//! mutations of valid TOCs and tars through the same entry points libFuzzer
//! drives. Any panic fails the test; the inputs are reproducible from the seed.

use sluice_format::chunked::{convert_tar, ChunkingOptions};
use sluice_format::fuzzing;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random edit: flip, overwrite with an interesting byte, insert, delete,
/// truncate, or duplicate a slice.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            v.push(0);
        }
        let at = rng.below(v.len());
        match rng.below(6) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = [0u8, 0xff, b'9', b'"', b'/', b'.', b'-', 0x7f][rng.below(8)],
            2 => v.insert(at, rng.next() as u8),
            3 => {
                v.remove(at);
            }
            4 => v.truncate(at),
            _ => {
                let len = rng.below(64).min(v.len() - at);
                let piece = v[at..at + len].to_vec();
                let to = rng.below(v.len());
                v.splice(to..to, piece);
            }
        }
    }
    v
}

fn seed_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [("etc/a", &b"alpha\n"[..]), ("usr/bin/b", &[7u8; 3000][..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        b.append_data(&mut h, name, data).unwrap();
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    b.append_link(&mut h, "lnk", "/etc/a").unwrap();
    b.into_inner().unwrap()
}

#[test]
fn toc_and_tar_entry_points_survive_mutations() {
    let tar = seed_tar();
    let mut blob = Vec::new();
    let converted =
        convert_tar(&tar[..], &mut blob, &ChunkingOptions::with_average(1024, 1)).unwrap();
    let loc = converted.footer.toc;
    let toc_zstd = blob[loc.offset as usize..loc.end() as usize].to_vec();
    let toc_json = zstd::decode_all(&toc_zstd[..]).unwrap();

    let mut rng = Rng(0x05ee_d0f5_11ce);
    for _ in 0..3000 {
        fuzzing::toc(&mutate(&mut rng, &toc_json));
        fuzzing::toc(&mutate(&mut rng, &toc_zstd));
        fuzzing::toc(&mutate(&mut rng, &blob[blob.len() - 72..]));
    }
    for _ in 0..1500 {
        fuzzing::tar(&mutate(&mut rng, &tar));
    }
}
