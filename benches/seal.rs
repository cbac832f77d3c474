//! Seal throughput against a raw multipart upload of the same bytes to the same S3 server:
//! run by scripts/bench-seal.sh, which starts the server. This file only exists so that
//! `cargo bench` lists it; the measurement is end to end through the real CLI.
fn main() {
    println!("seal vs raw upload: run scripts/bench-seal.sh (needs the ../shared/bench servers)");
}
