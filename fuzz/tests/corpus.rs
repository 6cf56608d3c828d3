//! Every fuzz target as an ordinary test on stable (tests/run.sh runs this): each
//! target gets every input of its checked-in seed corpus (`seeds/<target>/`; libFuzzer's
//! own `corpus/` grows while fuzzing and is not checked in) and a fixed number of
//! inputs derived from them by seeded mutations (byte flips, truncations, insertions,
//! splices), the same every run. A panic names the target and the input in hex, to be
//! added to the seeds.

use std::path::PathBuf;

/// Derived inputs per corpus file.
const MUTATIONS: usize = 300;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !data.is_empty() => {
                let at = rng.below(data.len());
                data[at] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let at = rng.below(data.len());
                data[at] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            2 => data.truncate(rng.below(data.len() + 1)),
            3 => {
                let at = rng.below(data.len() + 1);
                let n = rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, junk);
            }
            _ if !other.is_empty() => {
                let at = rng.below(data.len() + 1);
                let from = rng.below(other.len());
                let to = from + rng.below(other.len() - from + 1);
                data.splice(at..at, other[from..to].iter().copied());
            }
            _ => {}
        }
    }
    data
}

fn run(target: &str, f: fn(&[u8])) {
    let seeds = corpus(target);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    let mut inputs = seeds.clone();
    for (i, seed) in seeds.iter().enumerate() {
        let other = &seeds[(i + 1) % seeds.len()];
        inputs.extend((0..MUTATIONS).map(|_| mutate(&mut rng, seed, other)));
    }
    for input in &inputs {
        let result = std::panic::catch_unwind(|| f(input));
        if let Err(panic) = result {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("fuzz target {target} panicked on input {hex}");
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn spec_corpus() {
    run("spec", plexvm_fuzz::spec);
}

#[test]
fn api_request_corpus() {
    run("api_request", plexvm_fuzz::api_request);
}

#[test]
fn blk_request_corpus() {
    run("blk_request", plexvm_fuzz::blk_request);
}

#[test]
fn backend_reply_corpus() {
    run("backend_reply", plexvm_fuzz::backend_reply);
}
