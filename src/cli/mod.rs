//! The `sealfs` command line: parse, run, map the outcome to one line and an exit code.

pub mod generate;
pub mod mount_opts;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};
use crate::exit;
use crate::keys::{KeySpec, Keyring};
use crate::seal::{self, Cancel, SealOptions};
use crate::store::Location;

#[derive(Parser, Debug)]
#[command(
    name = "sealfs",
    version,
    about = "Sealed (client-side encrypted) model files on S3, mounted as plaintext",
    long_about = LONG_ABOUT,
    after_long_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Log level for sealfs (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    /// Log line format: text (human) or json (one object per line).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Append log lines to this file (created 0600) instead of stderr. A daemonized mount
    /// without it logs to syslog/journald once it has left the terminal.
    #[arg(long, global = true)]
    pub log_file: Option<PathBuf>,
    /// Keep each KBS attestation's token and evidence as files (0600) in DIR, for auditors
    /// (`kbs:` keys; DIR must exist, this user's, mode 0700). The audit log has their
    /// SHA-256 either way.
    #[arg(long, global = true, value_name = "DIR")]
    pub attestation_log: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a new random 256-bit key file (mode 0600); never overwrites. With --signing, an
    /// ECDSA P-256 signing key (PKCS#8 PEM, 0600) and its public key at PATH.pub. With
    /// --shares K-of-N, a key ceremony: PATH is a directory (created 0700) that receives N
    /// share files, any K of which open the key (`--key shares:PATH,PATH,…`); the whole
    /// key is written nowhere.
    Keygen {
        path: PathBuf,
        #[arg(long, conflicts_with = "shares")]
        signing: bool,
        /// Split the key into N share files, any K of which open it (e.g. 2-of-3, 3-of-5).
        #[arg(long, value_name = "K-of-N", value_parser = parse_threshold)]
        shares: Option<crate::keys::shares::Threshold>,
    },
    /// Encrypt a file or directory and upload it as sealed objects under DEST.
    Seal {
        src: PathBuf,
        /// s3://BUCKET/PREFIX, file://PATH or a directory path.
        dest: String,
        /// kms:<key id|ARN|alias/NAME>, file:<path>, pkcs11:<RFC 7512 URI>, transit:[MOUNT/]NAME,
        /// shares:<path>,<path>,… (K share files of a `keygen --shares` ceremony) or
        /// tpm2:<path> (a key file sealed by `sealfs tpm2 seal`); repeat to wrap the DEK under
        /// several.
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// Extra encryption context pair (k=v), shown in every KMS audit record.
        #[arg(long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
        /// Plaintext chunk size: a power of two from 16KiB to 64MiB.
        #[arg(long, default_value = "1MiB", value_parser = parse_chunk_size)]
        chunk_size: u8,
        /// Replace files that are already sealed at DEST.
        #[arg(long)]
        force: bool,
        /// Multipart part size (at least 5MiB).
        #[arg(long, default_value = "16MiB", value_parser = parse_size)]
        part_size: u64,
        /// Parts sealed and uploaded in parallel.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Sign the model's manifest: file:<ECDSA P-256 PEM> or kms:<ECC_NIST_P256 key>.
        #[arg(long)]
        sign: Option<String>,
        /// The model version recorded in the manifest (default: the sealing time in ms).
        #[arg(long, default_value_t = 0)]
        model_version: u64,
        /// Seal only if SRC's model.sig (OpenSSF model_signing) verifies under one of these:
        /// file:<PEM public key> or kms:<key>; repeatable. Nothing is written otherwise.
        #[arg(long = "trust-signer")]
        trust_signers: Vec<String>,
    },
    /// Show what the key objects say (no key needed, nothing authenticated).
    Inspect {
        uri: String,
        #[arg(long)]
        json: bool,
        /// Also show which wrapped keys each of these keys opens (resolving it: a kbs: key
        /// is released, a TPM-sealed key unsealed); nothing is unwrapped.
        #[arg(long = "key")]
        keys: Vec<String>,
    },
    /// Authenticate every chunk of every sealed file; writes no plaintext.
    Verify {
        uri: String,
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// Require every model to be signed by one of these: file:<PEM public key> or
        /// kms:<key>; repeatable. Files outside a signed model are refused.
        #[arg(long = "trust-signer")]
        trust_signers: Vec<String>,
        /// Require every model to be the one whose manifest has this digest (sha256:HEX);
        /// files outside a model are refused.
        #[arg(long, value_parser = parse_digest)]
        model_digest: Option<String>,
    },
    /// Break-glass: decrypt sealed files to a local path.
    Unseal {
        src: String,
        dest: PathBuf,
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        #[arg(long)]
        force: bool,
        /// Unseal only the model whose manifest has this digest (sha256:HEX); files
        /// outside a model are refused.
        #[arg(long, value_parser = parse_digest)]
        model_digest: Option<String>,
    },
    /// Mount sealed files read-only as plaintext (daemonizes once the mount is live).
    #[command(after_help = MOUNT_OPTIONS_HELP)]
    Mount {
        /// s3://BUCKET/PREFIX, file://PATH or a directory path.
        uri: String,
        mountpoint: PathBuf,
        /// Trusted keys: files wrapped under none of them are refused (EACCES).
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// Serve only models signed by one of these (file:<PEM public key> or kms:<key>),
        /// every chunk checked against the signed manifest before it is released.
        #[arg(long = "trust-signer")]
        trust_signers: Vec<String>,
        /// Serve only the model whose manifest has this digest (sha256:HEX, as `seal` and
        /// `inspect` print it): deploy by digest.
        #[arg(long, value_parser = parse_digest)]
        model_digest: Option<String>,
        /// Locked memory for decrypted chunks.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        cache_size: u64,
        /// Keep sealed chunks (ciphertext, never plaintext) in this local directory too, so
        /// a restart or another mount reads them from disk; shared safely by many mounts.
        /// Created 0700; refused if others may write it or it is a symlink.
        #[arg(long, requires = "cache_dir_size")]
        cache_dir: Option<PathBuf>,
        /// Most bytes the cache directory may hold (least recently used entries go first).
        #[arg(long, value_parser = parse_size, requires = "cache_dir")]
        cache_dir_size: Option<u64>,
        /// Keep an unwrapped DEK this long after its file's last close (e.g. 30s, 5m).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        dek_grace: std::time::Duration,
        /// Ask the key provider this often whether each held DEK may still be unwrapped
        /// (one call per held DEK; a kbs: key is released again once per round); a refusal
        /// revokes the file at once, open handles and
        /// page cache included (0: never).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        revalidate: std::time::Duration,
        /// Revoke a held DEK once its revalidations have all failed for this long (provider
        /// unreachable or throttling: fail closed); 0: keep serving through any outage.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        revalidate_max_outage: std::time::Duration,
        /// Largest sequential read-ahead window (also bounded by a quarter of the cache).
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        max_prefetch: u64,
        /// At the first open of a file of a model, unwrap the DEKs of up to N other files
        /// of it in the background (N provider calls; each DEK held for --dek-grace), so a
        /// loader's next files open with no provider call. 0: off.
        #[arg(long, default_value_t = 0)]
        unwrap_ahead: usize,
        /// Re-list the prefix this often, so new, replaced and removed files show (0: never).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        list_ttl: std::time::Duration,
        /// Largest chunk size served (also the cache slot size); files sealed with larger
        /// chunks are hidden and logged. A power of two from 16KiB to 64MiB.
        #[arg(long, default_value = "1MiB", value_parser = parse_chunk_size)]
        max_chunk_size: u8,
        /// Most objects one listing of the prefix may hold; a larger one fails the listing.
        #[arg(long, default_value_t = crate::store::ListLimits::default().max_objects)]
        max_objects: usize,
        /// Bypass the kernel page cache (breaks mmap: safetensors, np.memmap).
        #[arg(long)]
        direct_io: bool,
        /// Stay attached to the terminal (systemd runs it this way).
        #[arg(long)]
        foreground: bool,
        /// Let every user read the mount (needs user_allow_other in /etc/fuse.conf).
        #[arg(long)]
        allow_other: bool,
        /// Let root read the mount too.
        #[arg(long)]
        allow_root: bool,
        /// Owner shown for files and directories (default: the mounting user).
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
        /// Permission bits of files (octal).
        #[arg(long, default_value = "444", value_parser = parse_mode)]
        file_mode: u16,
        /// Permission bits of directories (octal).
        #[arg(long, default_value = "555", value_parser = parse_mode)]
        dir_mode: u16,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Mount noexec (nothing on the mount can be executed).
        #[arg(long)]
        noexec: bool,
        /// Before serving, load each model's manifest and open one file, as the first reads
        /// would: a key refused (exit 4), a model unsigned, of another digest or tampered
        /// (exit 3) or a store failing (exit 5) fails the start instead of answering EACCES
        /// or EIO later. The CSI driver sets it on every publish.
        #[arg(long)]
        check_start: bool,
        /// Serve the FUSE connection on this inherited file descriptor, which someone else
        /// opened (/dev/fuse) and mounted (the CSI node plugin): MOUNTPOINT is then only a
        /// label for logs. This process opens no /dev/fuse and calls no mount(2); SIGTERM
        /// ends it, and the unmount belongs to whoever mounted.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(3..))]
        fuse_fd: Option<i32>,
        /// Read this inherited sealed memfd of volume secrets at start (the CSI mounter
        /// passes it): `keyFile` for `--key secret:keyFile`, `transitToken` for transit:.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(3..))]
        secrets_fd: Option<i32>,
    },
    /// Kubernetes CSI driver processes (deploy/kubernetes/): `mounter` serves FUSE
    /// connections that the node plugin mounted, one `mount --fuse-fd` child per volume.
    #[command(subcommand)]
    Csi(CsiCommand),
    /// Revoke now, in the daemon serving MOUNTPOINT, the DEKs it holds (all, or those of
    /// files under one key): wiped, with their cached chunks and the kernel's pages; every
    /// later read and open of those files is EACCES until a new open unwraps again.
    Revoke {
        mountpoint: PathBuf,
        /// Files with a wrapped DEK under this key (a --key URI the mount was given, or a
        /// slot id as `inspect` shows it).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        key: Option<String>,
        /// Every file the daemon holds a DEK for.
        #[arg(long)]
        all: bool,
    },
    /// Re-encrypt models under fresh DEKs wrapped only under --to-key (after a key
    /// compromise), in memory, as a new generation that each model's new manifest switches
    /// to at once; readers holding the old generation keep it. A model is resealed whole.
    Reseal {
        /// A model, a prefix of models, or one object (its model is resealed).
        uri: String,
        /// A key that can unwrap the DEKs now.
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// The keys of the new DEKs (exactly these).
        #[arg(long = "to-key", required = true)]
        to_keys: Vec<String>,
        /// Carry forward only models signed by one of these (the publisher's key, not the
        /// KEK being replaced); repeatable.
        #[arg(long = "trust-signer")]
        trust_signers: Vec<String>,
        /// Carry forward only the model whose manifest has this digest (sha256:HEX).
        #[arg(long, value_parser = parse_digest)]
        model_digest: Option<String>,
        /// Carry forward whatever the old key opens, without --trust-signer or
        /// --model-digest (a holder of the old key could have replaced the model).
        #[arg(long)]
        unverified_origin: bool,
        /// Sign the new manifest (required for a signed model).
        #[arg(long)]
        sign: Option<String>,
        /// Multipart part size (at least 5MiB).
        #[arg(long, default_value = "16MiB", value_parser = parse_size)]
        part_size: u64,
        /// Parts resealed and uploaded in parallel (memory ≈ jobs × part size).
        #[arg(long, default_value_t = 4)]
        jobs: usize,
    },
    /// Delete what each model's current manifest no longer serves (the generations a
    /// reseal or a republish replaced, files an earlier version had), once readers have had
    /// --grace to close them. The manifest is authenticated first (--key).
    Gc {
        uri: String,
        /// A key that opens the models' manifests.
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// Keep a replaced generation this long after the switch (e.g. 0, 30m, 24h).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        grace: std::time::Duration,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace the wrapped DEKs: the new set is exactly the --to-key list.
    Rewrap {
        uri: String,
        /// A key that can unwrap the DEK now.
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        #[arg(long = "to-key", required = true)]
        to_keys: Vec<String>,
    },
    /// TPM 2.0: bind a key file to this host's TPM and measured boot (`--key tpm2:PATH`).
    #[command(subcommand)]
    Tpm2(Tpm2Command),
    /// The sealed chunk cache of `mount --cache-dir` (ciphertext only).
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Entries and bytes in a cache directory.
    Stat {
        /// The directory given to `mount --cache-dir`.
        dir: PathBuf,
    },
    /// Deletes every entry of a cache directory (mounts using it read from the store again).
    Clear {
        /// The directory given to `mount --cache-dir`.
        dir: PathBuf,
    },
    /// Pre-pulls the sealed chunks under URI into a cache directory, with no key: a node
    /// can be warmed before it may decrypt anything. Entries count once a mount's manifest
    /// lists them.
    Warm {
        /// s3://BUCKET/PREFIX, file://PATH or a local path.
        uri: String,
        #[arg(long)]
        cache_dir: PathBuf,
        #[arg(long, value_parser = parse_size)]
        cache_dir_size: u64,
        /// Files fetched at once.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Files sealed with larger chunks are skipped (as a mount with this setting hides them).
        #[arg(long, default_value = "1MiB", value_parser = parse_chunk_size)]
        max_chunk_size: u8,
        /// Most objects the listing may hold.
        #[arg(long, default_value_t = crate::store::ListLimits::default().max_objects)]
        max_objects: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum Tpm2Command {
    /// Seal a key file to this host's TPM under the current values of some PCRs: OUT
    /// (created 0600, never overwritten) opens only on this TPM, and only while those PCRs
    /// hold the same values (same firmware, boot chain, Secure Boot state). Read it with
    /// `--key tpm2:OUT`; keep the key file itself offline, to reseal after an update.
    /// The TPM is reached through SEALFS_TPM2_TCTI (default device:/dev/tpmrm0).
    Seal {
        /// The key file to seal (as `sealfs keygen` writes it).
        #[arg(long, value_name = "KEY_FILE")]
        key_file: PathBuf,
        /// The PCR bank and PCRs whose current values the key is bound to (e.g.
        /// sha256:0,2,4,7: firmware, option ROMs, boot loader, Secure Boot policy).
        #[arg(long, value_name = "BANK:PCR,…", value_parser = parse_pcrs)]
        pcrs: crate::keys::tpm2::PcrSelection,
        /// The sealed key file to write.
        out: PathBuf,
    },
}

const LONG_ABOUT: &str = "\
Sealed (client-side encrypted) model files on S3, mounted as plaintext.

sealfs mounts an S3 prefix or a directory of sealed model files (chunked AES-256-GCM, each
file's key wrapped under keys you hold: AWS KMS, PKCS#11, Vault/OpenBao Transit, k-of-n key
shares or a key file) read-only as plaintext, so torch.load, safetensors or vLLM read the
weights unchanged. `mount -t fuse.sealfs` and /etc/fstab lines run the mount-helper form
(see sealfs-mount(1)); sealfs@.service mounts /etc/sealfs/NAME.conf at boot.";

const EXIT_CODES_HELP: &str = "\
Exit status: 0 success; 1 other failure; 2 bad arguments; 3 authentication failed
(tampered, truncated or swapped data); 4 a key refused (access denied, disabled, no trusted
key); 5 the store failed; 130 interrupted (partial work cleaned up).";

const MOUNT_OPTIONS_HELP: &str = "\
Options can also be given in the fstab form, -o name[=value],... (`_` or `-`), e.g.
  -o key=kms:alias/models-prod,cache_size=4GiB,allow_other
and the mount-helper form `sealfs SOURCE MOUNTPOINT -o ...` is what `mount -t fuse.sealfs`
runs. rw, ro, dev, nodev, suid, nosuid, exec, atime, noatime, relatime, defaults, auto,
noauto, user, users, nouser, _netdev and nofail are accepted and ignored: the mount is
always read-only, nodev, nosuid and noatime.";

/// The clap definition, built once (the CSI node checks every publish's child command line
/// with it; the fuzz harnesses parse with it).
pub fn command() -> &'static clap::Command {
    static CMD: std::sync::OnceLock<clap::Command> = std::sync::OnceLock::new();
    CMD.get_or_init(<Cli as clap::CommandFactory>::command)
}

/// Parses the process arguments, after mapping `-o` options and the helper form
/// ([`mount_opts`]); exits 2 with one line on a bad option, like clap does.
pub fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Packaging (`sealfs __generate DIR`), kept outside the clap definitions: clap_complete
    // offers even hidden subcommands, and no user should be offered this one.
    if let [_, verb, dir] = args.as_slice() {
        if verb == generate::VERB {
            std::process::exit(generate::run(std::path::Path::new(dir)));
        }
    }
    let mut cmd = Cli::command();
    let args = match mount_opts::rewrite(args, &cmd) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("sealfs: error: {e}");
            std::process::exit(exit::USAGE);
        }
    };
    // Only `--version` pays for the AEAD calibration its text reports (`-V` stays short).
    if args.iter().any(|a| a == "--version") {
        cmd = cmd.long_version(generate::long_version());
    }
    let mut matches = cmd.clone().get_matches_from(args);
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

/// Sizes like `1048576`, `64KiB`, `1MiB`, `1M`, `2GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: not a size"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{s:?}: unknown unit (use KiB, MiB, GiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Durations like `30s`, `5m`, `1h`, `250ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: not a duration"))?;
    Ok(match unit {
        "" | "s" => std::time::Duration::from_secs(n),
        "ms" => std::time::Duration::from_millis(n),
        "m" | "h" => {
            let per = if unit == "m" { 60 } else { 3600 };
            // Checked: an unchecked product wraps to a shorter duration in a release build.
            let secs = n
                .checked_mul(per)
                .ok_or_else(|| format!("{s:?}: too long"))?;
            std::time::Duration::from_secs(secs)
        }
        _ => return Err(format!("{s:?}: unknown unit (use ms, s, m, h)")),
    })
}

fn parse_pcrs(s: &str) -> Result<crate::keys::tpm2::PcrSelection, String> {
    s.parse()
}

fn parse_threshold(s: &str) -> Result<crate::keys::shares::Threshold, String> {
    s.parse()
}

fn parse_digest(s: &str) -> Result<String, String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!("{s:?}: expected sha256:<64 hex digits>"))
    }
}

fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?}: not an octal mode"))
}

fn parse_chunk_size(s: &str) -> Result<u8, String> {
    let n = parse_size(s)?;
    let log2 = n.trailing_zeros() as u8;
    let ok = n.is_power_of_two()
        && (crate::format::MIN_CHUNK_LOG2..=crate::format::MAX_CHUNK_LOG2).contains(&log2);
    if ok {
        Ok(log2)
    } else {
        Err(format!(
            "{s:?}: chunk size must be a power of two from 16KiB to 64MiB"
        ))
    }
}

async fn signer(spec: &str) -> Result<crate::sign::Signer> {
    let spec: crate::sign::SignerSpec = spec.parse().map_err(Error::from)?;
    crate::sign::Signer::resolve(&spec)
        .await
        .map_err(Error::from)
}

/// The `--trust-signer` set.
pub async fn trusted_signers(specs: &[String]) -> Result<crate::sign::TrustedSigners> {
    Ok(crate::sign::TrustedSigners::from_uris(specs).await?)
}

async fn keyring(specs: &[String]) -> Result<Keyring> {
    let specs = specs
        .iter()
        .map(|s| s.parse::<KeySpec>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Keyring::resolve(&specs).await?)
}

#[derive(Subcommand, Debug)]
pub enum CsiCommand {
    /// One per node, needing only CAP_IPC_LOCK: receives FUSE connections on a unix socket
    /// (0600, peer uid checked) and serves each with its own `sealfs mount --fuse-fd`
    /// child; never opens /dev/fuse, never mounts.
    Mounter {
        /// The unix socket the node plugin connects to.
        #[arg(long)]
        socket: PathBuf,
        /// A variable of the mounter's environment that its children inherit too, besides
        /// the AWS and Transit ones (repeat for several): a PKCS#11 module's configuration
        /// (SOFTHSM2_CONF, ChrystokiConfigurationPath, …).
        #[arg(long = "pass-env", value_name = "NAME")]
        pass_env: Vec<String>,
        /// How long, in seconds, the readers of a volume whose child crashed wait for a
        /// successor to take the connection over; then the mounter lets the connection go
        /// and they get ENOTCONN.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
        resume_timeout: u64,
        /// A node-wide cache of sealed chunks (ciphertext only) that every volume's child
        /// uses as `mount --cache-dir`: shared by all the node's pods, it survives restarts
        /// of pods, children and the mounter. Checked at start (0700, this user's).
        #[arg(long, requires = "cache_dir_size")]
        cache_dir: Option<PathBuf>,
        /// Most bytes the node-wide cache directory may hold.
        #[arg(long, value_parser = parse_size, requires = "cache_dir")]
        cache_dir_size: Option<u64>,
    },
    /// The CSI node plugin (one per node, privileged): the Identity and Node gRPC services
    /// on ENDPOINT. A publish mounts /dev/fuse at the pod's target and hands the connection
    /// to the mounter; it holds no key and serves no file.
    Node {
        /// unix:///PATH of the gRPC socket (kubelet's plugin directory).
        #[arg(long)]
        endpoint: String,
        /// This node's name (NodeGetInfo): the Kubernetes node name.
        #[arg(long)]
        node_id: String,
        /// The mounter's socket (`sealfs csi mounter --socket`).
        #[arg(long)]
        mounter_socket: PathBuf,
        /// Targets outside this directory are refused.
        #[arg(long, default_value = "/var/lib/kubelet")]
        kubelet_dir: PathBuf,
        /// A PKCS#11 module (absolute path in the mounter's image) that volumes' `pkcs11:`
        /// keys may name in module-path= (repeat for several); none: no `pkcs11:` volume key.
        #[arg(long = "pkcs11-module", value_name = "PATH")]
        pkcs11_modules: Vec<PathBuf>,
    },
}

/// Runs the command; returns the exit code after printing its output or one error line.
pub fn main_with(cli: Cli) -> i32 {
    // Before any thread (the runtime, the mount's fork): see process::scrub_env.
    crate::process::scrub_env();
    if let Err(e) = crate::telemetry::init(
        &cli.log_level,
        cli.log_format == "json",
        cli.log_file.as_deref(),
    ) {
        eprintln!("sealfs: error: {e}");
        return exit::USAGE;
    }
    // Every command, not only the mount: seal, unseal and rewrap hold DEKs and plaintext.
    crate::process::harden();
    if let Some(dir) = &cli.attestation_log {
        if let Err(e) = crate::keys::kbs::set_attestation_log(dir) {
            eprintln!("sealfs: error: {e}");
            return exit::USAGE;
        }
    }
    if let Command::Csi(CsiCommand::Mounter {
        socket,
        pass_env,
        resume_timeout,
        cache_dir,
        cache_dir_size,
    }) = &cli.command
    {
        // Threads and children of its own; no runtime.
        let opts = crate::csi::mounter::Options {
            pass_env: pass_env.clone(),
            resume_timeout: std::time::Duration::from_secs(*resume_timeout),
            cache_dir: cache_dir.clone().zip(*cache_dir_size),
        };
        return match crate::csi::mounter::run(socket, opts) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("sealfs: error: {e}");
                exit::FAILURE
            }
        };
    }
    if let Command::Mount { .. } = cli.command {
        // The mount forks before any thread exists, so it builds its own runtime.
        return crate::fuse::session::run(mount_args(cli.command));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sealfs: error: cannot start the runtime: {e}");
            return exit::FAILURE;
        }
    };
    if let Command::Csi(CsiCommand::Node {
        endpoint,
        node_id,
        mounter_socket,
        kubelet_dir,
        pkcs11_modules,
    }) = cli.command
    {
        let config = crate::csi::node::NodeConfig {
            node_id,
            kubelet_dir,
            mounter_socket,
            pkcs11_modules,
        };
        return match csi_node(&rt, endpoint, config) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("sealfs: error: {e}");
                exit::FAILURE
            }
        };
    }
    let (tx, cancel) = Cancel::new();
    rt.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        let _ = tx.send(true);
    });
    match rt.block_on(run(cli.command, &cancel)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sealfs: error: {}", crate::error_chain(&e));
            exit::code(&e)
        }
    }
}

fn csi_node(
    rt: &tokio::runtime::Runtime,
    endpoint: String,
    config: crate::csi::node::NodeConfig,
) -> std::result::Result<(), String> {
    let path = crate::csi::grpc::endpoint_path(&endpoint)?;
    if config.node_id.is_empty() {
        return Err("--node-id must not be empty".into());
    }
    if let Some(m) = config.pkcs11_modules.iter().find(|m| !m.is_absolute()) {
        return Err(format!(
            "--pkcs11-module {}: must be an absolute path",
            m.display()
        ));
    }
    let node = crate::csi::node::Node::new(config).map_err(|e| e.to_string())?;
    rt.block_on(crate::csi::grpc::serve(node, &path))
}

async fn run(cmd: Command, cancel: &Cancel) -> Result<i32> {
    match cmd {
        Command::Mount { .. } | Command::Csi(_) => unreachable!("handled in main_with"),
        Command::Keygen {
            path,
            signing,
            shares,
        } => {
            if let Some(t) = shares {
                let c = crate::keys::shares::keygen(t, &path)?;
                println!(
                    "wrote {} shares of key {} (ceremony {}): any {} of them open it",
                    t.n, c.key_id, c.id, t.k
                );
                for f in &c.files {
                    println!("  {}", f.display());
                }
            } else if signing {
                let id = crate::sign::keygen(&path).map_err(|e| Error::Usage(e.to_string()))?;
                println!("wrote {} and {}.pub ({id})", path.display(), path.display());
            } else {
                let id = crate::keys::file::keygen(&path)?;
                println!("wrote {} ({id})", path.display());
            }
        }
        Command::Seal {
            src,
            dest,
            keys,
            context,
            chunk_size,
            force,
            part_size,
            jobs,
            sign,
            model_version,
            trust_signers,
        } => {
            if part_size < 5 << 20 {
                return Err(Error::Usage(
                    "--part-size must be at least 5MiB (an S3 limit)".into(),
                ));
            }
            let dest = Location::parse(&dest).await?;
            let ring = keyring(&keys).await?;
            let opts = SealOptions {
                chunk_log2: chunk_size,
                context,
                force,
                part_size,
                jobs,
                progress: std::io::stderr().is_terminal(),
                model_version,
            };
            let gate = trusted_signers(&trust_signers).await?;
            let signer = match sign {
                Some(s) => Some(signer(&s).await?),
                None => None,
            };
            let model =
                seal::seal_model(&src, &dest, &ring, &opts, signer.as_ref(), &gate, cancel).await?;
            for k in &model.files {
                println!("sealed {}", dest.describe(k));
            }
            println!(
                "model {} version {} digest sha256:{} {}",
                dest.describe(&model.manifest),
                model.version,
                model.digest,
                match &model.signer {
                    Some(id) => format!("signed by {id}"),
                    None => "unsigned".into(),
                }
            );
        }
        Command::Inspect { uri, json, keys } => {
            let loc = Location::parse(&uri).await?;
            let ring = if keys.is_empty() {
                None
            } else {
                Some(keyring(&keys).await?)
            };
            let v = seal::inspect(&loc, ring.as_ref().map(|r| (&keys[..], r))).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).expect("JSON value"));
            } else {
                print_inspect(&v);
            }
            if v["files"].as_array().is_none_or(|f| f.is_empty()) {
                return Err(Error::NothingSealed(uri));
            }
        }
        Command::Verify {
            uri,
            keys,
            trust_signers,
            model_digest,
        } => {
            let loc = Location::parse(&uri).await?;
            let ring = keyring(&keys).await?;
            let origin = crate::manifest::Origin {
                signers: trusted_signers(&trust_signers).await?,
                pin: model_digest,
            };
            if let Some(why) =
                ring.origin_unproven(!origin.signers.is_empty(), origin.pin.is_some())
            {
                return Err(Error::Usage(why));
            }
            let (reports, models) = seal::verify(&loc, &ring, &origin, cancel).await?;
            for m in &models {
                println!(
                    "model {} version {} digest sha256:{} {}",
                    m.model,
                    m.version,
                    m.digest,
                    match &m.signer {
                        Some(id) => format!("signed by {id}"),
                        None => "(signature not checked: no --trust-signer)".into(),
                    }
                );
            }
            let mut failed: Vec<&Error> = Vec::new();
            for r in &reports {
                match &r.result {
                    Ok(n) => println!("ok    {} ({n} bytes)", r.file),
                    Err(e) => {
                        println!("FAIL  {}: {}", r.file, crate::error_chain(e));
                        failed.push(e);
                    }
                }
            }
            if let Some(first) = failed.first() {
                eprintln!(
                    "sealfs: error: {} of {} files failed verification",
                    failed.len(),
                    reports.len()
                );
                // docs/CLI.md: tampering anywhere wins; otherwise the first failure's code.
                let tampered = failed.iter().any(|e| e.is_integrity());
                return Ok(if tampered {
                    exit::INTEGRITY
                } else {
                    exit::code(first)
                });
            }
        }
        Command::Unseal {
            src,
            dest,
            keys,
            force,
            model_digest,
        } => {
            let loc = Location::parse(&src).await?;
            let ring = keyring(&keys).await?;
            if let Some(why) = ring.origin_unproven(false, model_digest.is_some()) {
                eprintln!("sealfs: warning: {why}; unsealing anyway (break-glass)");
            }
            let origin = crate::manifest::Origin {
                signers: Default::default(),
                pin: model_digest,
            };
            for p in seal::unseal(&loc, &dest, &ring, &origin, force, cancel).await? {
                println!("unsealed {}", p.display());
            }
        }
        Command::Revoke {
            mountpoint,
            key,
            all: _,
        } => {
            let line = match &key {
                Some(k) => format!("revoke key {k}"),
                None => "revoke all".to_string(),
            };
            let answer =
                crate::fuse::control::request(&mountpoint, &line).map_err(crate::Error::Usage)?;
            match answer.strip_prefix("revoked ") {
                Some(n) => println!("revoked {n} files at {}", mountpoint.display()),
                None => {
                    return Err(crate::Error::Usage(format!(
                        "{}: {}",
                        mountpoint.display(),
                        crate::format::naming::printable(&answer, 512)
                    )))
                }
            }
        }
        Command::Reseal {
            uri,
            keys,
            to_keys,
            trust_signers,
            model_digest,
            unverified_origin,
            sign,
            part_size,
            jobs,
        } => {
            if part_size < 5 << 20 {
                return Err(Error::Usage(
                    "--part-size must be at least 5MiB (an S3 limit)".into(),
                ));
            }
            let loc = Location::parse(&uri).await?;
            let from = keyring(&keys).await?;
            let to = keyring(&to_keys).await?;
            let trusted = trusted_signers(&trust_signers).await?;
            if let Some(why) = from.origin_unproven(!trusted.is_empty(), model_digest.is_some()) {
                return Err(Error::Usage(why));
            }
            let signer = match sign {
                Some(s) => Some(signer(&s).await?),
                None => None,
            };
            let job = seal::reseal::Job {
                from: &from,
                to: &to,
                trusted: &trusted,
                pin: model_digest.as_deref(),
                unverified: unverified_origin,
                signer: signer.as_ref(),
                opts: SealOptions {
                    part_size,
                    jobs,
                    progress: std::io::stderr().is_terminal(),
                    ..SealOptions::default()
                },
            };
            for r in seal::reseal(&loc, &job, cancel).await? {
                println!(
                    "resealed model {} generation {} -> {} ({} files, {} bytes) version {} digest sha256:{} {}",
                    loc.describe(&r.model),
                    r.from_generation,
                    r.generation,
                    r.files,
                    r.bytes,
                    r.version,
                    r.digest,
                    match &r.signer {
                        Some(id) => format!("signed by {id}"),
                        None => "unsigned".into(),
                    }
                );
            }
        }
        Command::Gc {
            uri,
            keys,
            grace,
            dry_run,
        } => {
            let loc = Location::parse(&uri).await?;
            let ring = keyring(&keys).await?;
            let c = seal::reseal::gc(&loc, &ring, grace, dry_run).await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            for k in &c.deleted {
                println!("{verb} {}", loc.describe(k));
            }
            for k in &c.waiting {
                println!("kept {} (replaced less than --grace ago)", loc.describe(k));
            }
        }
        Command::Cache(CacheCommand::Stat { dir }) => {
            let (n, bytes) =
                crate::cache::disk::stat(&dir).map_err(|e| Error::Usage(e.to_string()))?;
            println!("{}: {n} entries, {bytes} bytes", dir.display());
        }
        Command::Cache(CacheCommand::Warm {
            uri,
            cache_dir,
            cache_dir_size,
            jobs,
            max_chunk_size,
            max_objects,
        }) => {
            let loc = Location::parse(&uri).await?;
            let disk = crate::cache::disk::DiskCache::open(&cache_dir, cache_dir_size)
                .map_err(|e| Error::Usage(e.to_string()))?;
            let limits = crate::store::ListLimits {
                max_objects,
                ..Default::default()
            };
            let w = crate::cache::warm::warm(
                &loc.store,
                &loc.prefix,
                &disk,
                jobs,
                max_chunk_size,
                &limits,
            )
            .await?;
            // Everything queued reaches the disk (or fails) before the summary.
            let done =
                tokio::task::block_in_place(|| disk.flush(std::time::Duration::from_secs(600)));
            let st = &disk.stats;
            use std::sync::atomic::Ordering::Relaxed;
            println!(
                "warmed {} files: {} chunks, {} bytes ({} written, {} already there, {} skipped) into {}",
                w.files,
                w.chunks,
                w.bytes,
                st.written.load(Relaxed),
                st.present.load(Relaxed),
                st.write_skips.load(Relaxed),
                cache_dir.display()
            );
            for (file, why) in &w.failed {
                eprintln!("sealfs: {}: {why}", crate::format::naming::escaped(file));
            }
            if !w.failed.is_empty() {
                return Err(Error::Store(crate::store::StoreError::Failed {
                    op: "warm",
                    key: uri,
                    message: format!("{} files could not be fetched (above)", w.failed.len()),
                }));
            }
            let errors = st.write_errors.load(Relaxed);
            if !done || errors > 0 {
                eprintln!(
                    "sealfs: error: the cache directory {}: {errors} writes failed (see the log)",
                    cache_dir.display()
                );
                return Ok(exit::FAILURE);
            }
        }
        Command::Cache(CacheCommand::Clear { dir }) => {
            let n = crate::cache::disk::clear(&dir).map_err(|e| Error::Usage(e.to_string()))?;
            println!("{}: {n} entries deleted", dir.display());
        }
        Command::Tpm2(Tpm2Command::Seal {
            key_file,
            pcrs,
            out,
        }) => {
            let sealed = crate::keys::tpm2::seal(&key_file, &pcrs, &out).map_err(|e| match e {
                crate::keys::KeyError::Tpm2NotBuilt => Error::Usage(e.to_string()),
                e => Error::KeySetup(e),
            })?;
            println!(
                "wrote {} (sealed to this TPM under {})",
                out.display(),
                sealed.selection
            );
        }
        Command::Rewrap { uri, keys, to_keys } => {
            let loc = Location::parse(&uri).await?;
            let from = keyring(&keys).await?;
            let to = keyring(&to_keys).await?;
            for k in seal::rewrap(&loc, &from, &to).await? {
                println!("rewrapped {}", loc.describe(&k));
            }
        }
    }
    Ok(exit::OK)
}

fn mount_args(cmd: Command) -> crate::fuse::session::MountArgs {
    let Command::Mount {
        uri,
        mountpoint,
        keys,
        trust_signers,
        model_digest,
        cache_size,
        cache_dir,
        cache_dir_size,
        dek_grace,
        revalidate,
        revalidate_max_outage,
        max_prefetch,
        unwrap_ahead,
        list_ttl,
        max_chunk_size,
        max_objects,
        direct_io,
        foreground,
        allow_other,
        allow_root,
        uid,
        gid,
        file_mode,
        dir_mode,
        metrics_addr,
        noexec,
        check_start,
        fuse_fd,
        secrets_fd,
    } = cmd
    else {
        unreachable!("called for mount only")
    };
    let d = crate::fs::MountConfig::default();
    let config = crate::fs::MountConfig {
        cache_size: cache_size as usize,
        cache_dir: cache_dir.zip(cache_dir_size),
        dek_grace,
        revalidate,
        revalidate_max_outage,
        max_prefetch,
        unwrap_ahead,
        uid: uid.unwrap_or(d.uid),
        gid: gid.unwrap_or(d.gid),
        file_mode,
        dir_mode,
        direct_io,
        list_ttl,
        max_chunk_log2: max_chunk_size,
        model_digest,
        list_limits: crate::store::ListLimits {
            max_objects,
            ..d.list_limits
        },
        ..d
    };
    crate::fuse::session::MountArgs {
        metrics_addr,
        noexec,
        check_start,
        fuse_fd,
        secrets_fd,
        uri,
        mountpoint,
        keys,
        trust_signers,
        config,
        foreground,
        allow_other,
        allow_root,
    }
}

/// Text `inspect`. Everything shown comes from the store, unauthenticated: every string is
/// escaped, so a name or a context value cannot start a line of its own.
fn print_inspect(v: &serde_json::Value) {
    let t = |x: &serde_json::Value| crate::format::naming::escaped(x.as_str().unwrap_or(""));
    for f in v["files"].as_array().into_iter().flatten() {
        println!("{}", t(&f["file"]));
        if f["error"].is_string() {
            println!("  error: {}", t(&f["error"]));
            continue;
        }
        println!(
            "  format:          sealfs v{}, {}",
            f["version"],
            t(&f["suite"])
        );
        println!(
            "  plaintext size:  {} bytes in {} chunks of {}",
            f["plaintext_size"], f["chunks"], f["chunk_size"]
        );
        println!("  file id:         {}", t(&f["file_id"]));
        println!("  context:");
        for (k, val) in f["encryption_context"].as_object().into_iter().flatten() {
            println!("    {} = {}", crate::format::naming::escaped(k), t(val));
        }
        println!("  wrapped keys:");
        for s in f["wrapped_keys"].as_array().into_iter().flatten() {
            let escrow = if s["escrow"] == serde_json::json!(true) {
                " (escrow: break-glass only)"
            } else {
                ""
            };
            let opened: Vec<_> = s["opened_by"]
                .as_array()
                .into_iter()
                .flatten()
                .map(t)
                .collect();
            let opened = if opened.is_empty() {
                String::new()
            } else {
                format!(" (opened by {})", opened.join(", "))
            };
            println!("    {} {}{escrow}{opened}", t(&s["kind"]), t(&s["key_id"]));
        }
    }
    for m in v["models"].as_array().into_iter().flatten() {
        println!("model {}", t(&m["model"]));
        if m["signed"] == serde_json::json!(true) {
            println!(
                "  signed by:       {} ({})",
                t(&m["signer"]),
                t(&m["holder"])
            );
            println!("  version:         {}", m["version"]);
            println!("  sealed at:       {} (unix seconds)", m["sealed_at"]);
            println!("  manifest digest: {}", t(&m["manifest_digest"]));
        } else {
            println!("  unsigned (the manifest's version and digest need a key: sealfs verify)");
        }
        if m["error"].is_string() {
            println!("  error: {}", t(&m["error"]));
        }
    }
    for o in v["unsealed_objects"].as_array().into_iter().flatten() {
        println!("not sealed: {}", t(o));
    }
    for o in v["orphan_key_objects"].as_array().into_iter().flatten() {
        println!("key object without data object: {}", t(o));
    }
    for r in v["refused_names"].as_array().into_iter().flatten() {
        // Already escaped by inspect.
        println!(
            "refused name (hidden): {} ({})",
            r["name"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1TiB").is_err());
        assert_eq!(parse_chunk_size("1MiB"), Ok(20));
        assert!(parse_chunk_size("3MiB").is_err());
        assert!(parse_chunk_size("4KiB").is_err());
    }

    #[test]
    fn durations_never_wrap() {
        use std::time::Duration;
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        // Found by fuzz/fuzz_targets/mount_opts.rs: n * 60 overflowed (a panic in a debug
        // build, a shorter duration in a release build).
        for long in ["999999999999999999m", "18446744073709551615h"] {
            assert!(
                parse_duration(long).unwrap_err().contains("too long"),
                "{long}"
            );
        }
    }
}
