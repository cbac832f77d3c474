//! The node plugin ↔ mounter protocol: one JSON request per SOCK_SEQPACKET message (at most
//! [`MAX_MESSAGE`] bytes), with its descriptors passed by SCM_RIGHTS; one JSON reply.
//!
//! `publish` carries the FUSE connection (fd 0 of the message) and, optionally, a sealed
//! memfd with the volume's secrets (fd 1); the mounter starts one `sealfs mount --fuse-fd`
//! child for it and answers once the child serves or has failed. `unpublish` ends the
//! child of a target; `ping` answers whether the mounter is up (the node's `Probe`).

use std::collections::BTreeMap;

/// The most one message may hold.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The most descriptors one message may carry (the connection and the secrets).
pub const MAX_FDS: usize = 2;

/// Environment variables a publish may set for its child (an allow-list: the mount's own
/// settings and the standard AWS ones; nothing that changes how the binary loads).
pub const CHILD_ENV: &[&str] = &[
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "BAO_ADDR",
    "VAULT_ADDR",
    "SEALFS_KBS_URL",
    "SEALFS_CDH_URL",
    "SEALFS_ATTESTER",
];

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
        /// Variables for the child, from [`CHILD_ENV`] only.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Whether fd 1 of the message is the secrets memfd.
        #[serde(default)]
        secrets: bool,
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

/// Checks a publish's child options: long options only, no option the mounter itself sets
/// (`--fuse-fd`, `--secrets-fd`, `--foreground`), no NUL; and its environment against
/// [`CHILD_ENV`].
pub fn check_publish(args: &[String], env: &BTreeMap<String, String>) -> Result<(), String> {
    const RESERVED: &[&str] = &["--fuse-fd", "--secrets-fd", "--foreground", "--log-file"];
    for a in args {
        if a.contains('\0') {
            return Err("an option holds a NUL byte".into());
        }
        let name = a.split('=').next().unwrap_or("");
        if RESERVED.contains(&name) {
            return Err(format!("option {name} is the mounter's own"));
        }
    }
    if args.first().is_some_and(|a| !a.starts_with("--")) {
        return Err("options must start with a long option".into());
    }
    for (k, v) in env {
        if !CHILD_ENV.contains(&k.as_str()) {
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
        assert!(check_publish(&["--key".into(), "file:/k".into()], &env).is_ok());
        for bad in ["--fuse-fd", "--fuse-fd=5", "--secrets-fd", "--foreground"] {
            assert!(check_publish(&[bad.into()], &env).is_err(), "{bad}");
        }
        assert!(check_publish(&["file:/k".into()], &env).is_err());
        let mut env = BTreeMap::new();
        env.insert("LD_PRELOAD".to_string(), "/x.so".to_string());
        assert!(check_publish(&[], &env).unwrap_err().contains("LD_PRELOAD"));
    }
}
