# One entry point per job; .ci/run calls `make test` exactly as the README says.
.PHONY: demo test check fmt clippy bench fuzz deps package package-test pre-pr-check

demo:            ## seal a sample model on the embedded default (local dir + key file), mount, read back
	scripts/demo.sh

test:            ## the whole test suite (needs fuse3, moto_server, python3 numpy safetensors)
	scripts/test.sh

check: fmt-check clippy

fmt:
	cargo fmt --all

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --all-targets --features tpm2 -- -D warnings

bench:           ## AEAD crates x chunk sizes; seal vs raw multipart (see docs/PERFORMANCE.md)
	cargo bench --bench aead
	scripts/bench-seal.sh

fuzz:            ## a short run of each cargo-fuzz target (FUZZ_SECONDS, default 60)
	scripts/fuzz.sh

deps:            ## install what the tests need (apt fuse3, pip moto/numpy/safetensors, cargo-deb, maturin)
	scripts/install-test-deps.sh

package:         ## one release build -> target/debian/sealfs_*.deb and target/wheels/sealfs-*.whl
	scripts/install-package-tools.sh
	scripts/package.sh

package-test:    ## build both, install them as users do (as root), use them, remove them
	scripts/install-package-tools.sh
	scripts/package-test.sh

pre-pr-check: check test
