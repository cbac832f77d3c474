//! A CSI `NodePublishVolume` turned into one `sealfs mount` for the mounter: the volume
//! attributes (an allow-list), the PV's mount options (the fstab `-o` parser), the secrets
//! and the capability, each checked before anything is mounted. Pure: no I/O, so every
//! refusal is a unit test.
//!
//! Attributes (docs/KUBERNETES.md): `uri` (required), `keys` (key URIs, whitespace-separated;
//! `file:secret` is the `keyFile` secret), `trustSigner` (whitespace-separated),
//! `modelDigest`, `cacheSize`, `region`, `endpointUrl` (the S3 endpoint only),
//! `authenticationSource` (`driver`, the default, or `pod`), `awsRoleArn`; and the
//! `csi.storage.k8s.io/*` keys kubelet adds (pod info, service-account tokens).

use std::collections::{BTreeMap, HashMap};

use zeroize::Zeroizing;

use super::secrets::Secrets;
use crate::keys::KeySpec;

/// What kubelet adds with `podInfoOnMount` and `tokenRequests`.
pub const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
/// The most one secret value may hold (a key file is 79 bytes; a Transit token ~100).
pub const MAX_SECRET: usize = 8 * 1024;
/// The most one attribute value may hold.
pub const MAX_ATTRIBUTE: usize = 4096;
/// The most one `csi.storage.k8s.io/` value may hold (the service-account token map).
pub const MAX_KUBELET_ATTRIBUTE: usize = 64 * 1024;

/// A publish request, as the gRPC adapter hands it over (no prost types here).
pub struct Publish<'a> {
    pub volume_id: &'a str,
    pub target: &'a str,
    pub attributes: &'a HashMap<String, String>,
    /// Each value moved into zeroizing memory as it came off the request.
    pub secrets: &'a HashMap<String, Zeroizing<String>>,
    /// The PV's `mountOptions` (CSI `mount_flags`).
    pub mount_flags: &'a [String],
    pub fs_type: &'a str,
    /// The capability asks for a block device.
    pub block: bool,
    /// CSI `volume_mount_group` (the pod's fsGroup), or empty.
    pub mount_group: &'a str,
}

/// One checked volume: what the mounter's `publish` carries.
pub struct Plan {
    pub uri: String,
    /// `sealfs mount` long options (`--name=value`, `--switch`).
    pub args: Vec<String>,
    /// The child's environment ([`super::wire::PUBLISH_ENV`] only).
    pub env: BTreeMap<String, String>,
    pub secrets: Option<Secrets>,
    /// The pod, when kubelet said (`podInfoOnMount`): for the audit and log lines.
    pub pod: Option<Pod>,
    /// `authenticationSource: pod`: the child runs with the pod's identity only (the
    /// mounter gives it none of the driver's).
    pub pod_identity: bool,
}

/// The audience of the service-account token a pod's AWS identity needs (the CSIDriver's
/// `tokenRequests`).
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";

/// The pod a volume is published for (`csi.storage.k8s.io/pod.*`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

/// Why a publish is refused before anything is mounted (gRPC INVALID_ARGUMENT). Never holds
/// a secret's value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(m: impl Into<String>) -> Invalid {
    Invalid(m.into())
}

const ATTRIBUTES: &[&str] = &[
    "uri",
    "keys",
    "trustSigner",
    "modelDigest",
    "cacheSize",
    "region",
    "endpointUrl",
    "authenticationSource",
    "awsRoleArn",
];

/// Checks a publish and plans its mount. `pkcs11_modules`: the modules a `pkcs11:` key
/// may name (the node plugin's `--pkcs11-module`).
pub fn plan(p: &Publish, pkcs11_modules: &[std::path::PathBuf]) -> Result<Plan, Invalid> {
    if p.block {
        return Err(invalid(
            "a sealfs volume is a filesystem: block access is not supported",
        ));
    }
    if !(p.fs_type.is_empty() || p.fs_type == crate::mountinfo::FS_TYPE || p.fs_type == "sealfs") {
        return Err(invalid(format!(
            "fsType {:?}: a sealfs volume is fuse.sealfs",
            crate::format::naming::printable(p.fs_type, 64)
        )));
    }
    if p.volume_id.is_empty()
        || p.volume_id.len() > 256
        || p.volume_id.chars().any(char::is_control)
    {
        return Err(invalid(
            "volume id must be 1 to 256 characters without control characters",
        ));
    }
    let attrs = p.attributes;
    for (k, v) in attrs {
        if !ATTRIBUTES.contains(&k.as_str()) && !k.starts_with(KUBELET_PREFIX) {
            return Err(invalid(format!(
                "unknown volume attribute {:?} (known: {})",
                crate::format::naming::printable(k, 64),
                ATTRIBUTES.join(", ")
            )));
        }
        // Service-account tokens are long JWTs; every other value is short.
        let max = if k.starts_with(KUBELET_PREFIX) {
            MAX_KUBELET_ATTRIBUTE
        } else {
            MAX_ATTRIBUTE
        };
        if v.len() > max || v.contains('\0') {
            return Err(invalid(format!(
                "volume attribute {} is longer than {max} bytes or holds a NUL",
                crate::format::naming::printable(k, 64)
            )));
        }
    }
    let get = |k: &str| attrs.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let uri = get("uri").ok_or_else(|| invalid("volume attribute uri is required"))?;
    let secrets = secrets(p.secrets)?;

    // The attributes and the PV's mountOptions as long options, then one pass holding every
    // key and signer, from either, to the volume rules.
    let mut raw = Vec::new();
    for k in get("keys").unwrap_or("").split_whitespace() {
        raw.push(format!("--key={k}"));
    }
    for s in get("trustSigner").unwrap_or("").split_whitespace() {
        raw.push(format!("--trust-signer={s}"));
    }
    if let Some(d) = get("modelDigest") {
        raw.push(format!("--model-digest={d}"));
    }
    if let Some(c) = get("cacheSize") {
        raw.push(format!("--cache-size={c}"));
    }
    raw.extend(mount_flags(p.mount_flags)?);
    let mut args = Vec::with_capacity(raw.len() + 3);
    let mut hsm = false;
    for a in raw {
        if let Some(k) = a.strip_prefix("--key=") {
            let (k, pkcs11) = volume_key(k, pkcs11_modules)?;
            hsm |= pkcs11;
            args.push(format!("--key={k}"));
        } else if let Some(s) = a.strip_prefix("--trust-signer=") {
            volume_signer(s)?;
            args.push(a);
        } else {
            args.push(a);
        }
    }
    if args.iter().any(|a| a == "--key=secret:keyFile")
        && secrets.as_ref().is_none_or(|s| s.key_file.is_none())
    {
        return Err(invalid(
            "keys names file:secret but the volume's secret has no keyFile",
        ));
    }
    if hsm {
        // Whoever may create a pod writes an inline volume's key and PIN: each publish
        // would be one more PIN guess against the node's tokens (each child forgets the
        // last refusal), and a token locks after a few. HSM keys are for PersistentVolumes,
        // which an administrator creates.
        if attrs
            .get(&format!("{KUBELET_PREFIX}ephemeral"))
            .is_some_and(|v| v == "true")
        {
            return Err(invalid(
                "keys: a pkcs11: key is not allowed in an inline volume (use a PersistentVolume)",
            ));
        }
        if secrets.as_ref().is_none_or(|s| s.pkcs11_pin.is_none()) {
            return Err(invalid(format!(
                "keys names pin-source={} but the volume's secret has no pkcs11Pin",
                crate::keys::pkcs11::SECRET_PIN
            )));
        }
    }
    if !p.mount_group.is_empty() {
        let gid: u32 = p
            .mount_group
            .parse()
            .map_err(|_| invalid("volume mount group must be a numeric gid"))?;
        args.push(format!("--gid={gid}"));
    }
    // A key, signer or pin that refuses the model fails the publish, with its reason, in
    // the pod's events: not a mount that answers EACCES.
    args.push("--check-start".into());
    // Pods run as any uid: the kernel checks the modes the mount shows (default_permissions).
    if !args.iter().any(|a| a == "--allow-other") {
        args.push("--allow-other".into());
    }

    let mut env = BTreeMap::new();
    if let Some(r) = get("region") {
        env.insert("AWS_REGION".to_string(), r.to_string());
    }
    if let Some(e) = get("endpointUrl") {
        if !(e.starts_with("https://") || e.starts_with("http://")) {
            return Err(invalid("endpointUrl must be an http(s) URL"));
        }
        env.insert("AWS_ENDPOINT_URL_S3".to_string(), e.to_string());
    }
    match get("authenticationSource").unwrap_or("driver") {
        "driver" => {
            if get("awsRoleArn").is_some() {
                return Err(invalid(
                    "awsRoleArn needs authenticationSource: pod (the driver uses its own identity)",
                ));
            }
        }
        "pod" => {}
        other => {
            return Err(invalid(format!(
                "authenticationSource {:?}: driver or pod",
                crate::format::naming::printable(other, 32)
            )))
        }
    }
    let pod = pod(attrs)?;
    let pod_identity = get("authenticationSource") == Some("pod");
    let mut secrets = secrets;
    if pod_identity {
        let w = web_identity(attrs, get("awsRoleArn"), pod.as_ref())?;
        secrets
            .get_or_insert_with(Secrets::default)
            .aws_web_identity = Some(w);
    }
    if let Some(p) = &pod {
        secrets.get_or_insert_with(Secrets::default).pod = Some(p.clone());
    }
    super::wire::check_publish(uri, p.target, &args, &env).map_err(Invalid)?;
    child_argv_parses(uri, p.target, &args)?;
    Ok(Plan {
        uri: uri.to_string(),
        args,
        env,
        secrets,
        pod,
        pod_identity,
    })
}

/// The pod's AWS identity: `awsRoleArn`, the pod's token for [`STS_AUDIENCE`] from
/// `csi.storage.k8s.io/serviceAccount.tokens`, and a role session name that names the pod
/// (`sealfs.NAMESPACE.NAME`, or `sealfs.UID` when that is longer than STS allows), so that
/// CloudTrail shows which pod read what.
fn web_identity(
    attrs: &HashMap<String, String>,
    role_arn: Option<&str>,
    pod: Option<&Pod>,
) -> Result<super::secrets::WebIdentity, Invalid> {
    use crate::aws_identity::{check_role_arn, check_session_name, check_token};
    let role_arn = role_arn.ok_or_else(|| {
        invalid("authenticationSource: pod needs awsRoleArn (the role the pod's token assumes)")
    })?;
    check_role_arn(role_arn).map_err(|e| invalid(format!("awsRoleArn: {e}")))?;
    let pod = pod.ok_or_else(|| {
        invalid(
            "authenticationSource: pod needs the pod's name (the CSIDriver's podInfoOnMount: true)",
        )
    })?;
    let key = format!("{KUBELET_PREFIX}serviceAccount.tokens");
    let raw = attrs.get(&key).ok_or_else(|| {
        invalid(format!(
            "authenticationSource: pod needs the pod's token for {STS_AUDIENCE} (the CSIDriver's tokenRequests)"
        ))
    })?;
    // Members kubelet may add later are ignored: kubelet is not the adversary here.
    #[derive(serde::Deserialize)]
    struct Token {
        token: Zeroizing<String>,
        #[serde(rename = "expirationTimestamp")]
        _expires: String,
    }
    // Never the parse error's text: it may quote the token.
    let tokens: HashMap<String, Token> = serde_json::from_str(raw).map_err(|e| {
        invalid(format!(
            "{key} is not the token map kubelet writes ({})",
            crate::keys::json_error(&e)
        ))
    })?;
    let token = tokens
        .into_iter()
        .find(|(aud, _)| aud == STS_AUDIENCE)
        .map(|(_, t)| t.token)
        .ok_or_else(|| {
            invalid(format!(
                "{key} has no token for the audience {STS_AUDIENCE} (the CSIDriver's tokenRequests)"
            ))
        })?;
    check_token(&token).map_err(|e| invalid(format!("the pod's token: {e}")))?;
    let mut session_name = format!("sealfs.{}.{}", pod.namespace, pod.name);
    if check_session_name(&session_name).is_err() {
        session_name = format!("sealfs.{}", pod.uid);
        check_session_name(&session_name).map_err(invalid)?;
    }
    Ok(super::secrets::WebIdentity {
        role_arn: role_arn.to_string(),
        session_name,
        token,
    })
}

/// A key URI of a volume, as the child's `--key`: only keys whose URI names no file of the
/// node chosen by the volume's author (an inline volume's author would choose which node
/// file is read as a key, and a `pkcs11:` URI's `module-path` which library the child
/// loads): `kms:`, `transit:`, `kbs:`, `file:secret` for the `keyFile` secret, and
/// `pkcs11:` with a module the operator listed (`--pkcs11-module`) and the PIN from the
/// `pkcs11Pin` secret (`pin-source=secret:pkcs11Pin`).
/// Returns the child's key URI and whether it is a `pkcs11:` one.
fn volume_key(k: &str, pkcs11_modules: &[std::path::PathBuf]) -> Result<(String, bool), Invalid> {
    let spec: KeySpec = k
        .parse()
        .map_err(|e: crate::keys::KeyError| invalid(format!("keys: {e}")))?;
    match spec {
        KeySpec::File(p) if p.as_os_str() == "secret" => Ok(("secret:keyFile".into(), false)),
        KeySpec::SecretKeyFile => Ok(("secret:keyFile".into(), false)),
        KeySpec::Kms(_) | KeySpec::Transit { .. } | KeySpec::Kbs(_) => Ok((k.to_string(), false)),
        KeySpec::File(_) | KeySpec::Shares(_) => Err(invalid(
            "keys: a key file on the node is not a volume key: use file:secret with a keyFile secret",
        )),
        KeySpec::Pkcs11(u) => {
            use crate::keys::pkcs11::{PinSource, SECRET_PIN};
            if !pkcs11_modules.contains(&u.module_path) {
                return Err(invalid(format!(
                    "keys: module-path {:?} is not a module this driver allows (the node plugin's --pkcs11-module: {})",
                    crate::format::naming::printable(&u.module_path.to_string_lossy(), 256),
                    if pkcs11_modules.is_empty() {
                        "none".to_string()
                    } else {
                        pkcs11_modules
                            .iter()
                            .map(|m| m.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )));
            }
            if u.pin_source != Some(PinSource::Secret) {
                return Err(invalid(format!(
                    "keys: a pkcs11: volume key takes its PIN from the volume's secret: pin-source={SECRET_PIN} (a PIN file names a file of the node)"
                )));
            }
            Ok((k.to_string(), true))
        }
        KeySpec::Tpm2(_) => Err(invalid(
            "keys: tpm2: keys name a sealed key file of the node and are not volume keys: use kms:, transit:, kbs:, pkcs11: or file:secret",
        )),
    }
}

/// A signer of a volume: `kms:`, or `file:` (a public key: nothing secret is read); never
/// `pkcs11:`, whose `module-path` would choose a library for the child to load.
fn volume_signer(s: &str) -> Result<(), Invalid> {
    match s.parse::<crate::sign::SignerSpec>() {
        Ok(crate::sign::SignerSpec::Pkcs11(_)) => Err(invalid(
            "trustSigner: pkcs11: signers are not volume signers: use kms: or file:",
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(invalid(format!("trustSigner: {e}"))),
    }
}

/// The child's exact command line through clap and every value parser (sizes, digests,
/// durations, a flag given twice): a bad value is INVALID_ARGUMENT here, before anything is
/// mounted, not a child that exits 2 after the mount.
fn child_argv_parses(uri: &str, target: &str, args: &[String]) -> Result<(), Invalid> {
    let argv = ["sealfs", "mount", "--foreground", "--fuse-fd", "3"]
        .into_iter()
        .map(String::from)
        .chain(args.iter().cloned())
        .chain(["--".to_string(), uri.to_string(), target.to_string()]);
    crate::cli::command()
        .clone()
        .try_get_matches_from(argv)
        .map(drop)
        .map_err(|e| {
            // clap's message without its usage and help lines, on one line.
            let text = e.to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect();
            let msg = msg.join(" ");
            invalid(msg.strip_prefix("error: ").unwrap_or(&msg).to_string())
        })
}

/// The PV's `mountOptions`, through the fstab helper's `-o` parser, as long options.
fn mount_flags(flags: &[String]) -> Result<Vec<String>, Invalid> {
    if flags.is_empty() {
        return Ok(Vec::new());
    }
    let mut argv: Vec<std::ffi::OsString> = vec!["sealfs".into(), "mount".into()];
    for f in flags {
        argv.push("-o".into());
        argv.push(f.into());
    }
    let out = crate::cli::mount_opts::rewrite(argv, crate::cli::command())
        .map_err(|e| invalid(format!("mountOptions: {e}")))?;
    out.into_iter()
        .skip(2)
        .map(|a| {
            a.into_string()
                .map_err(|_| invalid("mountOptions must be UTF-8"))
        })
        .collect()
}

/// The secrets a volume may carry; anything else, a value too long or with a control
/// character (but the trailing newline a `--from-file` secret keeps) is refused, naming the
/// key only.
fn secrets(s: &HashMap<String, Zeroizing<String>>) -> Result<Option<Secrets>, Invalid> {
    if s.is_empty() {
        return Ok(None);
    }
    let mut out = Secrets::default();
    for (k, v) in s {
        // A PIN goes to the vendor's C module: no longer than a PIN file may be.
        let max = if k == "pkcs11Pin" {
            crate::keys::pkcs11::MAX_PIN
        } else {
            MAX_SECRET
        };
        if v.len() > max {
            return Err(invalid(format!(
                "secret {} is longer than {max} bytes",
                crate::format::naming::printable(k, 64)
            )));
        }
        let body = v.strip_suffix('\n').unwrap_or(v);
        if body.chars().any(char::is_control) {
            return Err(invalid(format!(
                "secret {} holds a control character",
                crate::format::naming::printable(k, 64)
            )));
        }
        let value = Some(v.clone());
        match k.as_str() {
            "keyFile" => out.key_file = value,
            "transitToken" => out.transit_token = value,
            "pkcs11Pin" => out.pkcs11_pin = value,
            other => {
                return Err(invalid(format!(
                    "unknown secret {:?} (known: keyFile, pkcs11Pin, transitToken)",
                    crate::format::naming::printable(other, 64)
                )))
            }
        }
    }
    Ok(Some(out))
}

/// A Kubernetes name or uid: 1 to 253 of `[A-Za-z0-9._-]`.
fn kube_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Pod {
    /// Every field a Kubernetes name (the service account may be empty): checked again by
    /// the mount that puts them on its audit lines.
    pub fn check(&self) -> Result<(), String> {
        let ok = kube_name(&self.namespace)
            && kube_name(&self.name)
            && kube_name(&self.uid)
            && (self.service_account.is_empty() || kube_name(&self.service_account));
        ok.then_some(())
            .ok_or_else(|| "the pod's names are not Kubernetes names".to_string())
    }
}

/// The pod, when kubelet names it: names and uid as Kubernetes makes them, or the publish
/// is refused.
fn pod(attrs: &HashMap<String, String>) -> Result<Option<Pod>, Invalid> {
    let get = |k: &str| -> Result<Option<String>, Invalid> {
        let Some(v) = attrs.get(&format!("{KUBELET_PREFIX}{k}")) else {
            return Ok(None);
        };
        if !kube_name(v) {
            return Err(invalid(format!(
                "{KUBELET_PREFIX}{k} is not a Kubernetes name: {:?}",
                crate::format::naming::printable(v, 64)
            )));
        }
        Ok(Some(v.clone()))
    };
    let (Some(namespace), Some(name), Some(uid)) =
        (get("pod.namespace")?, get("pod.name")?, get("pod.uid")?)
    else {
        return Ok(None);
    };
    Ok(Some(Pod {
        namespace,
        name,
        uid,
        service_account: get("serviceAccount.name")?.unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

    /// The node plugin's `--pkcs11-module` in these tests.
    fn modules() -> Vec<std::path::PathBuf> {
        vec![MODULE.into()]
    }

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn secret_map(kv: &[(&str, &str)]) -> HashMap<String, Zeroizing<String>> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), Zeroizing::new(v.to_string())))
            .collect()
    }

    fn try_plan(
        attrs: &[(&str, &str)],
        secrets: &[(&str, &str)],
        flags: &[&str],
    ) -> Result<Plan, Invalid> {
        let (a, s) = (map(attrs), secret_map(secrets));
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        plan(
            &Publish {
                volume_id: "vol-1",
                target: "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/v/mount",
                attributes: &a,
                secrets: &s,
                mount_flags: &flags,
                fs_type: "",
                block: false,
                mount_group: "",
            },
            &modules(),
        )
    }

    const DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";
    const KEY: &str =
        "sealfs-kek-v1:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";

    #[test]
    fn a_full_volume_becomes_allow_listed_options_and_environment() {
        let p = try_plan(
            &[
                ("uri", "s3://models/llama"),
                ("keys", " file:secret\tkms:alias/models "),
                ("trustSigner", "file:/etc/sealfs/publisher.pub"),
                ("modelDigest", DIGEST),
                ("cacheSize", "1GiB"),
                ("region", "eu-west-1"),
                ("endpointUrl", "http://127.0.0.1:9000"),
                ("csi.storage.k8s.io/pod.namespace", "ml"),
                ("csi.storage.k8s.io/pod.name", "vllm-0"),
                ("csi.storage.k8s.io/pod.uid", "u-1"),
                ("csi.storage.k8s.io/serviceAccount.name", "vllm"),
                ("csi.storage.k8s.io/ephemeral", "false"),
            ],
            &[("keyFile", KEY)],
            &["direct-io", "max-prefetch=4"],
        )
        .unwrap();
        assert_eq!(p.uri, "s3://models/llama");
        assert_eq!(
            p.args,
            [
                "--key=secret:keyFile",
                "--key=kms:alias/models",
                "--trust-signer=file:/etc/sealfs/publisher.pub",
                &format!("--model-digest={DIGEST}"),
                "--cache-size=1GiB",
                "--direct-io",
                "--max-prefetch=4",
                "--check-start",
                "--allow-other",
            ]
        );
        assert_eq!(p.env["AWS_REGION"], "eu-west-1");
        assert_eq!(p.env["AWS_ENDPOINT_URL_S3"], "http://127.0.0.1:9000");
        assert!(p.secrets.unwrap().key_file.is_some());
        assert_eq!(
            p.pod.unwrap(),
            Pod {
                namespace: "ml".into(),
                name: "vllm-0".into(),
                uid: "u-1".into(),
                service_account: "vllm".into()
            }
        );
    }

    #[test]
    fn every_bad_volume_is_refused_with_its_reason_and_no_secret_value() {
        let uri = ("uri", "s3://b/m");
        type Case<'a> = (
            &'a [(&'a str, &'a str)],
            &'a [(&'a str, &'a str)],
            &'a [&'a str],
            &'a str,
        );
        let cases: &[Case] = &[
            (&[], &[], &[], "uri is required"),
            (
                &[uri],
                &[],
                &[],
                "required arguments were not provided: --key",
            ),
            (
                &[uri, ("bucket", "x")],
                &[],
                &[],
                "unknown volume attribute \"bucket\"",
            ),
            (&[uri, ("keys", "vault:x")], &[], &[], "keys:"),
            (
                &[uri, ("keys", "file:/etc/shadow")],
                &[],
                &[],
                "not a volume key",
            ),
            (
                &[uri, ("keys", "shares:/a,/b")],
                &[],
                &[],
                "not a volume key",
            ),
            (&[uri, ("keys", "file:secret")], &[], &[], "has no keyFile"),
            (&[uri, ("trustSigner", "nope")], &[], &[], "trustSigner"),
            (&[uri, ("cacheSize", "lots")], &[], &[], "--cache-size"),
            (
                &[uri, ("modelDigest", "sha256:00")],
                &[],
                &[],
                "--model-digest",
            ),
            (
                &[uri, ("cacheSize", "1GiB")],
                &[],
                &["cache_size=2GiB"],
                "--cache-size",
            ),
            (&[uri], &[], &["max_prefetch=lots"], "--max-prefetch"),
            (
                &[
                    uri,
                    ("keys", "pkcs11:token=t;object=k?module-path=/tmp/evil.so"),
                ],
                &[],
                &[],
                "module-path \"/tmp/evil.so\" is not a module this driver allows (the node plugin's --pkcs11-module: /usr/lib/softhsm/libsofthsm2.so)",
            ),
            (
                &[
                    uri,
                    (
                        "keys",
                        "pkcs11:token=t;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin",
                    ),
                ],
                &[("pkcs11Pin", "1234")],
                &[],
                "takes its PIN from the volume's secret: pin-source=secret:pkcs11Pin",
            ),
            (
                &[
                    uri,
                    (
                        "keys",
                        "pkcs11:token=t;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so",
                    ),
                ],
                &[],
                &[],
                "takes its PIN from the volume's secret",
            ),
            (
                &[
                    uri,
                    (
                        "keys",
                        "pkcs11:token=t;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=secret:pkcs11Pin",
                    ),
                ],
                &[("keyFile", KEY)],
                &[],
                "keys names pin-source=secret:pkcs11Pin but the volume's secret has no pkcs11Pin",
            ),
            (
                &[uri, ("keys", "tpm2:/etc/sealfs/k.tpm")],
                &[],
                &[],
                "not volume keys",
            ),
            (
                &[uri],
                &[],
                &["key=pkcs11:token=t;object=k?module-path=/tmp/evil.so"],
                "is not a module this driver allows",
            ),
            (
                &[
                    uri,
                    (
                        "trustSigner",
                        "pkcs11:token=t;object=s?module-path=/tmp/evil.so",
                    ),
                ],
                &[],
                &[],
                "not volume signers",
            ),
            (
                &[uri, ("endpointUrl", "file:///x")],
                &[],
                &[],
                "endpointUrl",
            ),
            (
                &[uri, ("authenticationSource", "node")],
                &[],
                &[],
                "driver or pod",
            ),
            (
                &[uri, ("awsRoleArn", "arn:aws:iam::1:role/r")],
                &[],
                &[],
                "awsRoleArn",
            ),
            (&[("uri", "http://x/y")], &[], &[], "uri must be"),
            (
                &[uri],
                &[("keyFile", "sealfs-kek-v1:00\u{1b}[2J\n")],
                &[],
                "secret keyFile holds a control",
            ),
            (
                &[uri],
                &[("keyFile", "a\nb\n")],
                &[],
                "secret keyFile holds a control",
            ),
            (
                &[uri],
                &[("password", "hunter2")],
                &[],
                "unknown secret \"password\"",
            ),
            (
                &[uri],
                &[],
                &["log-file=/tmp/x"],
                "option --log-file is not allowed",
            ),
            (
                &[uri],
                &[],
                &["allow-root"],
                "option --allow-root is not allowed",
            ),
            (&[uri], &[], &["no-such-option"], "mountOptions"),
            (&[uri], &[], &["key=file:/x;rm -rf /"], "not a volume key"),
            (&[uri], &[], &["key=file:secret"], "has no keyFile"),
            (&[uri], &[], &["trust-signer=bogus"], "trustSigner"),
            (&[uri], &[], &["metrics-addr=0.0.0.0:1"], "not allowed"),
            (&[uri], &[], &["foreground"], "not allowed"),
        ];
        for (attrs, secrets, flags, want) in cases {
            let e = try_plan(attrs, secrets, flags).err().unwrap_or_else(|| {
                panic!("accepted: {attrs:?} {flags:?}");
            });
            assert!(e.0.contains(want), "{attrs:?} {flags:?}: {e}");
            for (_, v) in secrets.iter() {
                assert!(!e.0.contains(v.trim_end()), "secret echoed: {e}");
            }
        }
        let long = "x".repeat(MAX_SECRET + 1);
        let e = try_plan(&[uri], &[("transitToken", &long)], &[])
            .err()
            .unwrap();
        assert_eq!(
            e.0,
            format!("secret transitToken is longer than {MAX_SECRET} bytes")
        );
    }

    #[test]
    fn block_access_another_fs_type_and_a_bad_group_are_refused() {
        let (a, s) = (
            map(&[("uri", "s3://b/m"), ("keys", "kms:alias/m")]),
            HashMap::new(),
        );
        let base = Publish {
            volume_id: "v",
            target: "/var/lib/kubelet/x/mount",
            attributes: &a,
            secrets: &s,
            mount_flags: &[],
            fs_type: "",
            block: false,
            mount_group: "",
        };
        assert!(plan(
            &Publish {
                block: true,
                ..base
            },
            &modules()
        )
        .err()
        .unwrap()
        .0
        .contains("block"));
        assert!(plan(
            &Publish {
                fs_type: "ext4",
                ..base
            },
            &modules()
        )
        .err()
        .unwrap()
        .0
        .contains("fsType"));
        assert!(plan(
            &Publish {
                mount_group: "wheel",
                ..base
            },
            &modules()
        )
        .err()
        .unwrap()
        .0
        .contains("gid"));
        let p = plan(
            &Publish {
                mount_group: "2000",
                ..base
            },
            &modules(),
        )
        .unwrap();
        assert!(p.args.contains(&"--gid=2000".to_string()));
        assert!(p.pod.is_none());
    }

    const ROLE: &str = "arn:aws:iam::123456789012:role/models-reader";
    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln";

    fn pod_attrs<'a>(tokens: &'a str, name: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("uri", "s3://models/llama"),
            ("keys", "kms:alias/models"),
            ("authenticationSource", "pod"),
            ("awsRoleArn", ROLE),
            ("csi.storage.k8s.io/pod.namespace", "ml"),
            ("csi.storage.k8s.io/pod.name", name),
            (
                "csi.storage.k8s.io/pod.uid",
                "0b4f8c1e-5d2a-4c1b-9e7f-3a6d2c1b0a99",
            ),
            ("csi.storage.k8s.io/serviceAccount.name", "vllm"),
            ("csi.storage.k8s.io/serviceAccount.tokens", tokens),
        ]
    }

    #[test]
    fn a_pod_identity_volume_carries_the_pods_token_role_and_name_in_its_secrets() {
        let tokens = format!(
            r#"{{"other.example":{{"token":"a.b.c","expirationTimestamp":"x"}},"sts.amazonaws.com":{{"token":"{JWT}","expirationTimestamp":"2026-12-07T08:00:00Z"}}}}"#
        );
        let p = try_plan(&pod_attrs(&tokens, "vllm-0"), &[], &[]).unwrap();
        assert!(p.pod_identity);
        let s = p.secrets.unwrap();
        let w = s.aws_web_identity.unwrap();
        assert_eq!(w.role_arn, ROLE);
        assert_eq!(w.session_name, "sealfs.ml.vllm-0");
        assert_eq!(w.token.as_str(), JWT);
        assert_eq!(s.pod.unwrap().name, "vllm-0");
        // Nothing of it in argv or the environment.
        assert!(!p.args.iter().any(|a| a.contains(JWT) || a.contains(ROLE)));
        assert!(p.env.is_empty());
        // A pod name too long for a session name: the uid names it.
        let long = "p".repeat(60);
        let p = try_plan(&pod_attrs(&tokens, &long), &[], &[]).unwrap();
        assert_eq!(
            p.secrets.unwrap().aws_web_identity.unwrap().session_name,
            "sealfs.0b4f8c1e-5d2a-4c1b-9e7f-3a6d2c1b0a99"
        );
        // The driver's identity: no token travels, whatever kubelet sent.
        let mut driver = pod_attrs(&tokens, "vllm-0");
        driver.retain(|(k, _)| *k != "awsRoleArn");
        driver[2] = ("authenticationSource", "driver");
        let p = try_plan(&driver, &[], &[]).unwrap();
        assert!(!p.pod_identity);
        assert!(p.secrets.unwrap().aws_web_identity.is_none());
    }

    #[test]
    fn a_pod_identity_volume_without_a_usable_token_role_or_pod_is_refused() {
        let good =
            format!(r#"{{"sts.amazonaws.com":{{"token":"{JWT}","expirationTimestamp":"x"}}}}"#);
        let wrong_aud = format!(r#"{{"vault":{{"token":"{JWT}","expirationTimestamp":"x"}}}}"#);
        let not_jwt =
            r#"{"sts.amazonaws.com":{"token":"secret-token value","expirationTimestamp":"x"}}"#;
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                pod_attrs(&wrong_aud, "p"),
                "no token for the audience sts.amazonaws.com",
            ),
            (pod_attrs(not_jwt, "p"), "the pod's token: not a JWT"),
            (pod_attrs("[1]", "p"), "not the token map kubelet writes"),
            (pod_attrs(&good, "p q"), "not a Kubernetes name"),
            (
                {
                    let mut a = pod_attrs(&good, "p");
                    a.retain(|(k, _)| !k.ends_with("serviceAccount.tokens"));
                    a
                },
                "tokenRequests",
            ),
            (
                {
                    let mut a = pod_attrs(&good, "p");
                    a.retain(|(k, _)| *k != "awsRoleArn");
                    a
                },
                "needs awsRoleArn",
            ),
            (
                {
                    let mut a = pod_attrs(&good, "p");
                    a[3] = ("awsRoleArn", "arn:aws:iam::123456789012:user/alice");
                    a
                },
                "awsRoleArn: not an IAM role ARN",
            ),
            (
                {
                    let mut a = pod_attrs(&good, "p");
                    a.retain(|(k, _)| !k.ends_with("pod.name"));
                    a
                },
                "podInfoOnMount",
            ),
        ];
        for (attrs, want) in cases {
            let e = try_plan(&attrs, &[], &[])
                .err()
                .unwrap_or_else(|| panic!("accepted: {want}"));
            assert!(e.0.contains(want), "{want}: {e}");
            assert!(
                !e.0.contains("secret-token") && !e.0.contains(JWT),
                "token echoed: {e}"
            );
        }
    }

    #[test]
    fn a_pkcs11_key_with_an_allowed_module_takes_its_pin_from_the_secret() {
        let key = format!(
            "pkcs11:token=models;object=kek?module-path={MODULE}&pin-source=secret:pkcs11Pin"
        );
        let p = try_plan(
            &[("uri", "s3://b/m"), ("keys", &key)],
            &[("pkcs11Pin", "123456\n")],
            &[],
        )
        .unwrap();
        assert!(p.args.contains(&format!("--key={key}")));
        assert_eq!(
            p.secrets.unwrap().pkcs11_pin.as_deref().map(|s| s.as_str()),
            Some("123456\n")
        );
        // No module allowed: refused.
        let (a, s) = (
            map(&[("uri", "s3://b/m"), ("keys", &key)]),
            secret_map(&[("pkcs11Pin", "123456")]),
        );
        let e = plan(
            &Publish {
                volume_id: "v",
                target: "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/v/mount",
                attributes: &a,
                secrets: &s,
                mount_flags: &[],
                fs_type: "",
                block: false,
                mount_group: "",
            },
            &[],
        )
        .err()
        .unwrap();
        assert!(e.0.contains("--pkcs11-module: none"), "{e}");
        // An inline volume: whoever creates pods would get PIN guesses.
        let e = try_plan(
            &[
                ("uri", "s3://b/m"),
                ("keys", &key),
                ("csi.storage.k8s.io/ephemeral", "true"),
            ],
            &[("pkcs11Pin", "123456")],
            &[],
        )
        .err()
        .unwrap();
        assert!(e.0.contains("not allowed in an inline volume"), "{e}");
        // A PIN longer than a PIN file may be.
        let long = "1".repeat(crate::keys::pkcs11::MAX_PIN + 1);
        let e = try_plan(
            &[("uri", "s3://b/m"), ("keys", &key)],
            &[("pkcs11Pin", &long)],
            &[],
        )
        .err()
        .unwrap();
        assert_eq!(e.0, "secret pkcs11Pin is longer than 256 bytes");
        // Percent-encoded pin-source is the same secret (the URI parser decodes it).
        let encoded = key.replace("secret:pkcs11Pin", "secret%3Apkcs11Pin");
        let e = try_plan(&[("uri", "s3://b/m"), ("keys", &encoded)], &[], &[])
            .err()
            .unwrap();
        assert!(e.0.contains("has no pkcs11Pin"), "{e}");
    }
}
