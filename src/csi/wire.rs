//! The node plugin ↔ mounter protocol: one JSON request per SOCK_SEQPACKET message (at most
//! [`MAX_MESSAGE`] bytes), with its descriptors passed by SCM_RIGHTS; one JSON reply.
//!
//! `publish` carries the FUSE connection (fd 0 of the message) and, optionally, a sealed
//! memfd with the volume's secrets (fd 1); the mounter starts one `sealfs mount --fuse-fd`
//! child for it and answers once the child serves or has failed. `unpublish` ends the
//! child of a target; `ping` answers whether the mounter is up (the node's `Probe`).

use std::collections::BTreeMap;
use std::time::Duration;

/// How long a child may take to serve (keys resolved, models listed and checked) before the
/// mounter kills it.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child has to exit after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the node waits for a publish's answer: the mounter's worst case (the target's
/// old child stopped, the new one waited for, then killed) and a margin.
pub const PUBLISH_TIMEOUT: Duration =
    Duration::from_secs(READY_TIMEOUT.as_secs() + 2 * STOP_TIMEOUT.as_secs() + 5);

/// The most one message may hold.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The most descriptors one message may carry (the connection and the secrets).
pub const MAX_FDS: usize = 2;

/// Environment variables a publish may set for its child. Never an STS, KMS or generic
/// endpoint, nor an identity (role, token file): the child may run with the driver's
/// credentials, and the SDK sends a web-identity token to whatever STS endpoint its
/// environment names (`AWS_ENDPOINT_URL` included). Only the S3 endpoint, whose requests
/// are signed and carry no credential.
pub const PUBLISH_ENV: &[&str] = &[
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
    "BAO_ADDR",
    "VAULT_ADDR",
    "SEALFS_KBS_URL",
    "SEALFS_CDH_URL",
    "SEALFS_ATTESTER",
];

/// What every child inherits from the mounter's own environment (the operator's settings:
/// endpoints, logs), besides [`PUBLISH_ENV`].
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "RUST_LOG",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_ENDPOINT_URL_STS",
    "AWS_EC2_METADATA_DISABLED",
];

/// The driver's identity (keys, a token file and role, a profile): inherited from the
/// mounter by the children of `authenticationSource: driver` volumes only. A pod-identity
/// child gets none of it, and `AWS_EC2_METADATA_DISABLED=true`: never the node's instance
/// role. Container-credential variables (EKS Pod Identity, ECS) are passed to no child.
pub const DRIVER_IDENTITY_ENV: &[&str] = &[
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_PROFILE",
];

/// The `mount` options a publish may give, each as ONE token `--name=value` (valued) or
/// `--name` (switch): no separate values, no `-o` lists, nothing that moves logs, serves
/// on a network or widens who may read (`--log-*`, `--attestation-log`, `--metrics-addr`,
/// `--allow-root`), nothing the mounter sets itself.
const VALUED: &[&str] = &[
    "key",
    "trust-signer",
    "model-digest",
    "cache-size",
    "dek-grace",
    "revalidate",
    "revalidate-max-outage",
    "max-prefetch",
    "unwrap-ahead",
    "list-ttl",
    "max-chunk-size",
    "max-objects",
    "uid",
    "gid",
    "file-mode",
    "dir-mode",
];
const SWITCHES: &[&str] = &["direct-io", "allow-other", "noexec", "check-start"];

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Publish {
        /// The target path (the child's label; the mounter never opens it).
        target: String,
        /// The store URI.
        uri: String,
        /// `sealfs mount` options after the URI and target (long options only).
        args: Vec<String>,
        /// Variables for the child, from [`PUBLISH_ENV`] only.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Whether fd 1 of the message is the secrets memfd.
        #[serde(default)]
        secrets: bool,
        /// `authenticationSource: pod`: the child gets none of the driver's identity
        /// ([`DRIVER_IDENTITY_ENV`]); its only one is the pod's, in the secrets.
        #[serde(default)]
        pod_identity: bool,
    },
    /// A fresh token for the pod-identity child serving `target` (fd 0 of the message: a
    /// sealed memfd holding a `secrets::Refresh`).
    Refresh {
        target: String,
    },
    Unpublish {
        target: String,
    },
    // A struct variant: serde's deny_unknown_fields does not reach unit variants.
    Ping {},
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub ok: bool,
    /// The child's pid (publish), when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The child's exit code when it failed (sealfs's exit codes: 4 a refused key, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// One line: why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(pid: Option<u32>) -> Self {
        Self {
            ok: true,
            pid,
            code: None,
            error: None,
        }
    }

    pub fn failed(code: i32, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            pid: None,
            code: Some(code),
            error: Some(error.into()),
        }
    }
}

/// Checks a publish: the URI (`s3://`, `file://` or an absolute path) and target (an
/// absolute path), neither with a control character; every option against the allow-list
/// ([`VALUED`] as `--name=value`, [`SWITCHES`] as `--name`); the environment against
/// [`PUBLISH_ENV`]. The child's argv then ends `-- URI TARGET`.
pub fn check_publish(
    uri: &str,
    target: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Result<(), String> {
    let clean = |s: &str| !s.is_empty() && s.len() <= 4096 && !s.chars().any(char::is_control);
    if !clean(uri)
        || !(uri.starts_with("s3://") || uri.starts_with("file://") || uri.starts_with('/'))
    {
        return Err("uri must be s3://…, file://… or an absolute path".into());
    }
    if !clean(target) || !target.starts_with('/') {
        return Err("target must be an absolute path".into());
    }
    for a in args {
        if !clean(a) {
            return Err("an option is empty, too long or holds a control character".into());
        }
        let Some(opt) = a.strip_prefix("--") else {
            return Err(format!("{a:?}: only --name=value and --switch options"));
        };
        match opt.split_once('=') {
            Some((name, _)) if VALUED.contains(&name) => {}
            None if SWITCHES.contains(&opt) => {}
            _ => {
                let name = opt.split('=').next().unwrap_or("");
                return Err(format!("option --{name} is not allowed in a publish"));
            }
        }
    }
    for (k, v) in env {
        if !PUBLISH_ENV.contains(&k.as_str()) {
            return Err(format!("environment variable {k:?} is not allowed"));
        }
        if v.contains('\0') {
            return Err(format!("environment variable {k} holds a NUL byte"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_strict_json() {
        let r: Request = serde_json::from_str(r#"{"op":"ping"}"#).unwrap();
        assert_eq!(r, Request::Ping {});
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"format"}"#).is_err());
        let r: Request = serde_json::from_str(
            r#"{"op":"publish","target":"/t","uri":"file:///s","args":["--key","file:/k"]}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::Publish { secrets: false, .. }));
    }

    #[test]
    fn publish_options_and_environment_are_allow_listed() {
        let env = BTreeMap::new();
        let ok = |args: &[&str]| {
            let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            check_publish("s3://b/m", "/var/lib/kubelet/pods/p/mount", &a, &env)
        };
        assert!(ok(&["--key=file:/k", "--allow-other", "--cache-size=1GiB"]).is_ok());
        for bad in [
            "--fuse-fd=5",
            "--secrets-fd=4",
            "--foreground",
            "--log-file=/run/x",
            "--attestation-log=/run",
            "--metrics-addr=0.0.0.0:9464",
            "--allow-root",
            "--log-level=trace",
            "-olog_file=/run/x.log,allow_root",
            "-o",
            "--key",
            "file:/k",
            "--key=a\nb",
        ] {
            assert!(ok(&[bad]).is_err(), "{bad}");
        }
        for (uri, target) in [
            ("-olog_file=/x", "/t"),
            ("--log-level=trace", "/t"),
            ("s3://b/m", "relative"),
            ("s3://b/m", "-x"),
            ("http://x", "/t"),
            ("s3://b/m\n", "/t"),
        ] {
            assert!(
                check_publish(uri, target, &[], &env).is_err(),
                "{uri} {target}"
            );
        }
        let mut bad_env = BTreeMap::new();
        for k in [
            "LD_PRELOAD",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_STS",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
        ] {
            bad_env.clear();
            bad_env.insert(k.to_string(), "x".to_string());
            let e = check_publish("s3://b/m", "/t", &[], &bad_env).unwrap_err();
            assert!(e.contains(k), "{e}");
        }
    }
}
