//! Test harness: the real `sealfs` binary, `moto_server` (S3 + KMS on one 127.0.0.1 port)
//! behind `tools/fault_proxy.py` (call counts, byte counts, fault injection). Every process
//! started here is killed in `Drop`, also when a test fails. A missing part is a failure,
//! never a skip.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sealfs"))
}

/// Runs `sealfs` with exactly the given environment on top of a clean one.
pub fn sealfs(args: &[&str], env: &[(String, String)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    c.env("HOME", std::env::temp_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run sealfs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code and returns stdout + stderr for further checks.
#[track_caller]
pub fn expect_code(o: &Output, code: i32) -> String {
    let all = format!("{}{}", stdout(o), stderr(o));
    assert_eq!(
        o.status.code(),
        Some(code),
        "unexpected exit status; output:\n{all}"
    );
    all
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free right now, whose neighbour `port + 1` is free too, neither handed
/// out before in this test process: parallel tests that each start a server on "a free
/// port" must not get the same one, nor one's neighbour (an OpenBao dev server also binds
/// its cluster listener on `port + 1`); a server that then failed to bind would leave its
/// test talking to another test's server.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let taken = |p: u16| given.contains(&p);
        let next_free =
            port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok();
        if next_free && !taken(port) && !taken(port + 1) && !taken(port.wrapping_sub(1)) {
            given.extend([port, port + 1]);
            return port;
        }
    }
}

/// One request to 127.0.0.1:`port` (`Connection: close`, 10 s read timeout): the status and
/// the body, or `None` when nothing usable came back.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool, child: &mut Child) {
    let start = Instant::now();
    while !ready() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited before it was ready ({st})");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} not ready after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// moto_server behind the fault proxy. The tools are required: CI installs them.
pub struct Stack {
    _dir: tempfile::TempDir,
    proxy: Proc,
    moto: Proc,
    pub moto_port: u16,
    pub proxy_port: u16,
}

impl Stack {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let moto_port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("moto_server not runnable ({e}): pip install 'moto[server]>=5.2.5'")
            });
        let mut moto = Proc(child);
        wait_for(
            "moto_server",
            || http(moto_port, "GET", "/moto-api/", "").is_some(),
            &mut moto.0,
        );

        let port_file = dir.path().join("proxy.port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/fault_proxy.py");
        let child = Command::new("python3")
            .arg(&script)
            .args(["--upstream-port", &moto_port.to_string(), "--port-file"])
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 is required for tests/tools/fault_proxy.py");
        let mut proxy = Proc(child);
        wait_for("fault proxy", || port_file.exists(), &mut proxy.0);
        let proxy_port: u16 = std::fs::read_to_string(&port_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Self {
            _dir: dir,
            proxy,
            moto,
            moto_port,
            proxy_port,
        }
    }

    /// Environment for sealfs: everything goes through the proxy.
    pub fn env(&self) -> Vec<(String, String)> {
        let url = format!("http://127.0.0.1:{}", self.proxy_port);
        [
            ("AWS_ENDPOINT_URL", url.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub fn counts(&self) -> serde_json::Value {
        let (_, body) = http(self.proxy_port, "GET", "/__proxy/counts", "").expect("proxy counts");
        serde_json::from_str(&body).unwrap()
    }

    pub fn count(&self, name: &str) -> u64 {
        self.counts()[name].as_u64().unwrap_or(0)
    }

    pub fn reset(&self) {
        http(self.proxy_port, "POST", "/__proxy/reset", "").expect("proxy reset");
    }

    /// From now until `reset`, LIST answers carry no ETags (as some S3-compatible servers).
    pub fn strip_list_etags(&self) {
        http(self.proxy_port, "POST", "/__proxy/strip-list-etags", "").expect("proxy strip");
    }

    pub fn fault(&self, spec: serde_json::Value) {
        http(self.proxy_port, "POST", "/__proxy/fault", &spec.to_string()).expect("proxy fault");
    }

    fn control(&self, path: &str, body: &str) {
        let (status, text) = http(self.proxy_port, "POST", path, body).expect("proxy control");
        assert_eq!(status, 200, "{path} {body}: {text}");
    }

    /// From now until `reset`, every ListObjectsV2 is answered by the proxy: truncated,
    /// with `objects` objects per page and a continuation token that is fresh each page
    /// (`same_token` false) or always the same: a listing that never ends by itself.
    pub fn endless_list(&self, same_token: bool, objects: usize) {
        let mode = if same_token { "same" } else { "fresh" };
        self.control(
            "/__proxy/list-mode",
            &serde_json::json!({"endless": mode, "objects": objects}).to_string(),
        );
    }

    /// From now until `reset`, a GET of a key ending with `suffix` is answered with `bytes`
    /// bytes, streamed (the proxy stops when the client hangs up; see `huge_bytes_sent`).
    pub fn huge_get(&self, suffix: &str, bytes: u64) {
        self.control(
            "/__proxy/huge-get",
            &serde_json::json!({"suffix": suffix, "bytes": bytes}).to_string(),
        );
    }

    /// From now until `reset`, every ranged GET's body is sent `bytes` at a time, each
    /// send on the wire at once, so the client reads it in many small pieces.
    pub fn dribble(&self, bytes: usize) {
        self.control("/__proxy/dribble", &format!("{{\"bytes\": {bytes}}}"));
    }

    /// From now until `reset`, GETs reach the store without their `Range` header: it
    /// answers 200 with the whole object, as a store ignoring Range does.
    pub fn ignore_range(&self) {
        self.control("/__proxy/ignore-range", "");
    }

    /// From now until `reset`, the first page of every LIST whose prefix a key starts with
    /// also holds these `(key, size)` entries, whatever bytes the keys hold.
    pub fn inject_list(&self, entries: &[(&str, u64)]) {
        let entries: Vec<_> = entries
            .iter()
            .map(|(k, n)| serde_json::json!({"key": k, "size": n}))
            .collect();
        self.control(
            "/__proxy/inject-list",
            &serde_json::json!({ "entries": entries }).to_string(),
        );
    }

    /// SDK config pointing at moto directly (setup calls stay out of the proxy's counts).
    async fn sdk(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(format!("http://127.0.0.1:{}", self.moto_port))
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .load()
            .await
    }

    pub async fn s3(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::config::Builder::from(&self.sdk().await)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Deletes every object of `bucket` whose key starts with `prefix`, as a bucket writer can.
    pub async fn delete_prefix(&self, bucket: &str, prefix: &str) {
        let s3 = self.s3().await;
        for (key, _) in self.keys_in(bucket).await {
            if key.starts_with(prefix) {
                s3.delete_object()
                    .bucket(bucket)
                    .key(&key)
                    .send()
                    .await
                    .unwrap();
            }
        }
    }

    pub async fn kms(&self) -> aws_sdk_kms::Client {
        aws_sdk_kms::Client::new(&self.sdk().await)
    }

    pub async fn create_bucket(&self, name: &str) {
        self.s3()
            .await
            .create_bucket()
            .bucket(name)
            .send()
            .await
            .unwrap();
    }

    /// A new symmetric KMS key; returns its key id.
    pub async fn create_key(&self, alias: Option<&str>) -> String {
        let kms = self.kms().await;
        let id = kms
            .create_key()
            .send()
            .await
            .unwrap()
            .key_metadata()
            .unwrap()
            .key_id()
            .to_string();
        if let Some(a) = alias {
            kms.create_alias()
                .alias_name(a)
                .target_key_id(&id)
                .send()
                .await
                .unwrap();
        }
        id
    }

    /// A KMS `ECC_NIST_P256` signing key (Sign/GetPublicKey); its key id.
    pub async fn create_signing_key(&self) -> String {
        self.kms()
            .await
            .create_key()
            .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
            .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
            .send()
            .await
            .unwrap()
            .key_metadata()
            .unwrap()
            .key_id()
            .to_string()
    }

    pub async fn keys_in(&self, bucket: &str) -> Vec<(String, i64)> {
        let out = self
            .s3()
            .await
            .list_objects_v2()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        out.contents()
            .iter()
            .map(|o| (o.key().unwrap().to_string(), o.size().unwrap_or(0)))
            .collect()
    }

    pub async fn open_uploads(&self, bucket: &str) -> usize {
        let out = self
            .s3()
            .await
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        out.uploads().len()
    }
}

/// Deterministic pseudo-random bytes (xorshift), so fixtures need no RNG crate.
/// A temporary directory with a key file `k`: paths under it, the key's URI, and source
/// files written into it. Test files add their own sealing helpers in `impl Site` blocks.
pub struct Site {
    pub dir: tempfile::TempDir,
}

impl Site {
    pub fn new() -> Self {
        let s = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        expect_code(&sealfs(&["keygen", &s.p("k")], &[]), 0);
        s
    }
    pub fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn key(&self) -> String {
        format!("file:{}", self.p("k"))
    }
    /// Writes `files` under `src/` and seals them to `store` under this site's key.
    pub fn seal_files(&self, files: &[(&str, Vec<u8>)]) {
        for (n, d) in files {
            self.write(&format!("src/{n}"), d);
        }
        expect_code(
            &sealfs(
                &[
                    "seal",
                    &self.p("src"),
                    &self.p("store"),
                    "--key",
                    &self.key(),
                ],
                &[],
            ),
            0,
        );
    }

    pub fn write(&self, rel: &str, data: &[u8]) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn sha256(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

pub fn s(v: &str) -> String {
    v.to_string()
}

/// A live `sealfs mount --foreground`, unmounted and stopped in `Drop` (also on panic).
/// Readiness is the daemon's own `READY=1` on a `$NOTIFY_SOCKET` we listen on: never a sleep.
pub struct Mount {
    child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Mount {
    pub fn start(uri: &str, args: &[&str], env: &[(String, String)]) -> Self {
        Self::try_start(uri, args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(uri: &str, args: &[&str], env: &[(String, String)]) -> Result<Self, String> {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse missing: FUSE tests cannot run here"
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let log = tmp.path().join("sealfs.log");
        let sock_path = tmp.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut c = Command::new(bin());
        c.arg("mount")
            .arg("--foreground")
            .arg(uri)
            .arg(&dir)
            .args(args);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        c.env("NOTIFY_SOCKET", &sock_path)
            .env("RUST_LOG", "sealfs=info,fuser=error");
        for (k, v) in env {
            c.env(k, v);
        }
        let logf = std::fs::File::create(&log).unwrap();
        c.stdout(Stdio::null()).stderr(Stdio::from(logf));
        let child = c.spawn().expect("spawn sealfs mount");
        let mut m = Self {
            child: Some(child),
            dir,
            log,
            _tmp: tmp,
        };
        let start = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            if let Ok(n) = sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                    return Ok(m);
                }
            }
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                return Err(format!("mount exited ({st}) before READY=1: {}", m.logs()));
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(format!("mount not ready after 60 s: {}", m.logs()));
            }
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_mounted(&self) -> bool {
        mountinfo(&self.dir).is_some()
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    /// [`Mount::stop`], asserting exit 0; a failure shows the daemon's log.
    pub fn stop_with_exit_0(&mut self) {
        let code = self.stop();
        assert_eq!(
            code,
            Some(0),
            "exit status (None: killed after 20 s); logs:\n{}",
            self.logs()
        );
    }

    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
        if self.is_mounted() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.dir)
                .status();
        }
    }
}

/// Unmounts `.0` (lazily) when dropped, if anything is mounted there: for tests that mount
/// without [`Mount`] (daemon mode), so that a failed assertion leaves no mount behind.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        if mountinfo(&self.0).is_some() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.0)
                .status();
        }
    }
}

/// The `/proc/self/mountinfo` line of the mount at `dir`, if there is one.
pub fn mountinfo(dir: &Path) -> Option<String> {
    let d = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(d.as_str()))
        .map(str::to_owned)
}

/// Peak RSS (VmHWM) of a process in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// How a bounded `sealfs` run ended.
pub struct Bounded {
    /// Exit code; `None` if it had to be killed at the time limit (or died by a signal).
    pub code: Option<i32>,
    /// stdout then stderr.
    pub output: String,
    pub elapsed: Duration,
    /// Peak RSS of the process (`ru_maxrss` from `wait4`), in bytes.
    pub peak_rss: u64,
    pub timed_out: bool,
}

/// Runs `sealfs` like [`sealfs`], but kills it after `limit` (a test never hangs on a
/// process that does not end) and measures that one process's peak RSS.
pub fn sealfs_bounded(args: &[&str], env: &[(String, String)], limit: Duration) -> Bounded {
    let tmp = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (tmp.path().join("out"), tmp.path().join("err"));
    let mut c = Command::new(bin());
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let start = Instant::now();
    let child = c.spawn().expect("run sealfs");
    let pid = child.id() as libc::pid_t;
    // Reaped by wait4 below, so `child` is never waited on (nor killed) through std.
    std::mem::forget(child);
    let mut timed_out = false;
    let (status, usage) = loop {
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            break (status, usage);
        }
        if !timed_out && start.elapsed() > limit {
            timed_out = true;
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let output = format!(
        "{}{}",
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    Bounded {
        code,
        output,
        elapsed,
        peak_rss: usage.ru_maxrss as u64 * 1024,
        timed_out,
    }
}

/// Runs `tests/python/<script>` with args; panics with its output on failure.
pub fn python(script: &str, args: &[&str]) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = Command::new("python3")
        .arg(&p)
        .args(args)
        .output()
        .expect("python3 is required");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

/// The metrics page at 127.0.0.1:`port`, as name{labels} → value (sums truncated).
pub fn scrape(port: u16) -> std::collections::HashMap<String, u64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with("sealfs_"))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_string(), v.parse::<f64>().unwrap() as u64))
        })
        .collect()
}

/// An `strace -f -e trace=open,openat,mount,umount2` log of processes that serve a passed
/// FUSE connection: it must show them (`seen`, e.g. the key file they open) and no open of
/// /dev/fuse nor any mount(2)/umount2(2).
pub fn assert_no_fuse_open_or_mount(trace: &Path, seen: &str) {
    let log = std::fs::read_to_string(trace).unwrap();
    assert!(
        log.contains(seen),
        "strace did not trace the servers: {log}"
    );
    for l in log.lines() {
        assert!(!l.contains("/dev/fuse"), "opened /dev/fuse: {l}");
        assert!(
            !l.contains(" mount(") && !l.contains("umount2("),
            "called mount: {l}"
        );
    }
}
