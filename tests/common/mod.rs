//! Shared harness for nbraid's integration tests.
//!
//! Every test gets its own temporary directory (members, sockets, logs). The daemon is the real
//! binary (`CARGO_BIN_EXE_nbraid`) and the clients are real, independent tools (qemu-io,
//! nbdinfo, nbdcopy, fio, nbdfuse + losetup + mkfs.ext4 + mount). A missing tool fails the test
//! with a message; nothing is ever skipped.
//!
//! Teardown is by Drop guards, so it also happens when an assertion fails half-way.
#![allow(dead_code)]

pub mod admin;
pub mod nbd;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_nbraid");
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// Metadata reserved at the start of every member (superblocks, bitmap). The data area starts
/// here only for `--checksums off` on a level without parity: the checksum table and the
/// partial-parity log come after it, so ask [`data_offset`] where the data is.
pub const META: u64 = MIB;

/// Generous bound for things that must happen (daemon ready, daemon exit). Hang guard only; no
/// test asserts on elapsed time.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicUsize = AtomicUsize::new(0);
fn unique() -> usize {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

// ------------------------------------------------------------------------------------------
// tools

/// Absolute path of an external tool, or a test failure naming it.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for extra in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required external tool `{name}` was not found in PATH (or /usr/sbin, /sbin). \
         Install the test dependencies with `bash tools/test.sh` (Debian packages: fio \
         libnbd-bin qemu-utils fuse3 nbdkit e2fsprogs util-linux)."
    );
}

/// Run a command to completion; a failure to spawn fails the test.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null());
    match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("could not run {:?}: {e}", cmd),
    }
}

pub fn show(o: &Output) -> String {
    format!("status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Run and require exit status 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let o = run(cmd);
    assert!(o.status.success(), "command {:?} failed\n{}", cmd, show(&o));
    o
}

// ------------------------------------------------------------------------------------------
// temp dirs, members

pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
}

impl TestDir {
    /// A fresh directory. Kept after the test if NBRAID_KEEP_TMP is set (for debugging).
    pub fn new(tag: &str) -> TestDir {
        // Unix socket paths are limited to ~107 bytes: keep the directory short.
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let dir = tempfile::Builder::new().prefix(&format!("nbraid-{tag}-")).tempdir_in(&base).expect("create temp dir");
        let path = dir.path().to_path_buf();
        if std::env::var_os("NBRAID_KEEP_TMP").is_some() {
            let p = dir.keep();
            eprintln!("keeping {}", p.display());
            return TestDir { dir: None, path: p };
        }
        TestDir { dir: Some(dir), path }
    }

    /// An existing directory that is not removed on drop.
    pub fn at(path: PathBuf) -> TestDir {
        TestDir { dir: None, path }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Paths `prefix0..prefixN` (not created: `nbraid create --size` creates them).
    pub fn members(&self, prefix: &str, n: usize) -> Vec<PathBuf> {
        (0..n).map(|i| self.join(format!("{prefix}{i}"))).collect()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = self.dir.take();
    }
}

pub fn nbraid() -> Command {
    Command::new(BIN)
}

/// `nbraid create ARGS... MEMBERS...`, which must succeed.
pub fn create(args: &[&str], members: &[PathBuf]) -> Output {
    let mut c = nbraid();
    c.arg("create").args(args).args(members);
    run_ok(&mut c)
}

/// `nbraid create` that must fail; returns the output for inspecting the message.
pub fn create_fails(args: &[&str], members: &[PathBuf]) -> Output {
    let mut c = nbraid();
    c.arg("create").args(args).args(members);
    let o = run(&mut c);
    assert!(!o.status.success(), "create {:?} {:?} should have failed\n{}", args, members, show(&o));
    assert!(!o.stderr.is_empty(), "create {:?} failed without a message on stderr\n{}", args, show(&o));
    o
}

/// `nbraid check MEMBERS...`: returns (exit ok, N from "inconsistent stripes: N", output).
/// Blocks failing their checksum are not in N: see [`check_counts`].
pub fn check(members: &[PathBuf]) -> (bool, u64, Output) {
    let c = check_counts(members);
    (c.ok, c.inconsistent, c.output)
}

/// What `nbraid check` reported.
pub struct CheckCounts {
    /// exit status 0
    pub ok: bool,
    /// "inconsistent stripes: N": stripes whose blocks all pass their checksums but whose
    /// parity or mirror copies disagree
    pub inconsistent: u64,
    /// "blocks failing their checksum: N"; None when the volume keeps no checksums (`check`
    /// prints "block checksums: none")
    pub failing: Option<u64>,
    pub output: Output,
}

impl CheckCounts {
    /// Blocks failing their checksum (0 for a volume without checksums).
    pub fn failing(&self) -> u64 {
        self.failing.unwrap_or(0)
    }
}

/// `nbraid check MEMBERS...` with both of its counts. A volume with checksums must print the
/// checksum line, one without must say it has none.
pub fn check_counts(members: &[PathBuf]) -> CheckCounts {
    let o = run(nbraid().arg("check").args(members));
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let count = |label: &str| {
        text.lines().find_map(|l| {
            let i = l.find(label)?;
            l[i + label.len()..].split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let inconsistent = count("inconsistent stripes:").unwrap_or_else(|| panic!("`nbraid check` printed no `inconsistent stripes: N` line\n{}", show(&o)));
    let failing = count("blocks failing their checksum:");
    let without = text.contains("block checksums: none");
    assert!(failing.is_some() != without, "`nbraid check` should print either `blocks failing their checksum: N` or `block checksums: none`\n{}", show(&o));
    CheckCounts { ok: o.status.success(), inconsistent, failing, output: o }
}

/// `nbraid check` must report 0 inconsistent stripes, 0 blocks failing their checksum and exit 0.
pub fn check_clean(members: &[PathBuf]) {
    let c = check_counts(members);
    assert!(
        c.ok && c.inconsistent == 0 && c.failing() == 0,
        "expected a consistent volume (exit 0, inconsistent stripes: 0, blocks failing their checksum: 0)\n{}",
        show(&c.output)
    );
}

/// `nbraid check` must find damage: a non-zero exit, and inconsistent stripes or blocks failing
/// their checksum (either count > 0).
pub fn check_dirty(members: &[PathBuf], what: &str) -> CheckCounts {
    let c = check_counts(members);
    assert!(
        !c.ok && (c.inconsistent > 0 || c.failing() > 0),
        "after {what}, `nbraid check` should exit non-zero with inconsistent stripes or blocks failing their checksum > 0\n{}",
        show(&c.output)
    );
    c
}

// ------------------------------------------------------------------------------------------
// the member layout, from its superblock

/// Where a member keeps what (from its superblock, little-endian; see src/meta/superblock.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberLayout {
    /// u64 at byte 80
    pub chunk: u64,
    /// u64 at byte 88: where the data area starts (after the first MiB of metadata, the
    /// checksum table and the partial-parity log, on a 1 MiB boundary)
    pub data_offset: u64,
    /// u64 at byte 96: bytes of data area on each member (whole stripes)
    pub member_data_bytes: u64,
    /// u64 at byte 3392: where the checksum table starts, 0 without checksums
    pub checksum_table: u64,
}

/// The layout of `member`, from the newest of its two superblock copies (at 0 and 4096) that
/// has the magic and a good crc32c.
pub fn member_layout(member: &Path) -> MemberLayout {
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let best = [0u64, 4096]
        .iter()
        .map(|&at| read_at(member, at, 4096))
        .filter(|b| &b[0..8] == b"NBRAIDSB" && crc32c::crc32c(&b[..4092]) == u32::from_le_bytes(b[4092..].try_into().unwrap()))
        .max_by_key(|b| u64_at(b, 56))
        .unwrap_or_else(|| panic!("{}: no valid nbraid superblock at 0 or 4096", member.display()));
    let l =
        MemberLayout { chunk: u64_at(&best, 80), data_offset: u64_at(&best, 88), member_data_bytes: u64_at(&best, 96), checksum_table: u64_at(&best, 3392) };
    assert!(
        l.data_offset >= META && l.data_offset.is_multiple_of(MIB) && l.chunk > 0 && l.member_data_bytes.is_multiple_of(l.chunk),
        "{}: implausible layout in the superblock: {l:?}",
        member.display()
    );
    l
}

/// Where the data area starts on `member` (superblock: u64 at byte 88).
pub fn data_offset(member: &Path) -> u64 {
    member_layout(member).data_offset
}

/// Bytes of data area on `member` (superblock: u64 at byte 96).
pub fn member_data_bytes(member: &Path) -> u64 {
    member_layout(member).member_data_bytes
}

// ------------------------------------------------------------------------------------------
// the daemon

pub struct Daemon {
    child: Option<Child>,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub members: Vec<PathBuf>,
}

impl Daemon {
    /// `nbraid serve --listen unix:SOCK MEMBERS...`, waiting until the socket accepts.
    pub fn start(dir: &TestDir, members: &[PathBuf]) -> Daemon {
        Self::start_with(dir, members, &[])
    }

    /// With a control socket (`--control DIR/ctlN`); returns the daemon and the socket path.
    pub fn start_controlled(dir: &TestDir, members: &[PathBuf]) -> (Daemon, PathBuf) {
        let ctl = dir.join(format!("ctl{}", unique()));
        let d = Self::start_with(dir, members, &["--control", ctl.to_str().unwrap()]);
        (d, ctl)
    }

    /// Start and wait until ready. Members must be free the moment a previous daemon exited
    /// (cleanly or by kill -9): no retry here, so a lingering member lock fails the test.
    pub fn start_with(dir: &TestDir, members: &[PathBuf], extra: &[&str]) -> Daemon {
        let n = unique();
        let sock = dir.join(format!("nbd{n}.sock"));
        let log = dir.join(format!("daemon{n}.log"));
        let mut d = Self::spawn(dir, members, extra, &sock, &log);
        d.wait_ready();
        d
    }

    /// Start right after a `kill -9` of the previous daemon on these members.
    pub fn start_after_crash(dir: &TestDir, members: &[PathBuf]) -> Daemon {
        Self::start(dir, members)
    }

    /// Spawn without waiting (for tests that expect `serve` to refuse).
    pub fn spawn(dir: &TestDir, members: &[PathBuf], extra: &[&str], sock: &Path, log: &Path) -> Daemon {
        let _ = dir;
        let errf = File::create(log).expect("create daemon log");
        let outf = errf.try_clone().unwrap();
        let mut listen = std::ffi::OsString::from("unix:");
        listen.push(sock);
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(BIN);
        // If the test process dies without running Drop (Ctrl-C, SIGKILL), the daemon gets a
        // SIGTERM instead of living on (it is in its own process group, see below).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .arg("serve")
            .arg("--listen")
            .arg(&listen)
            .args(extra)
            .args(members)
            .env("RUST_BACKTRACE", "1")
            // its own process group: signals aimed at the test's group do not reach it
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(outf)
            .stderr(errf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        Daemon { child: Some(child), sock: sock.to_path_buf(), log: log.to_path_buf(), members: members.to_vec() }
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child_status() {
                panic!("nbraid serve {:?} exited early with {st} before becoming ready\n--- daemon stderr ---\n{}", self.members, self.stderr());
            }
            if self.sock.exists() && UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!("nbraid serve did not accept on {} within {:?}\n--- daemon stderr ---\n{}", self.sock.display(), READY_TIMEOUT, self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn child_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already stopped").id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.child_status().is_none()
    }

    /// Default export ("").
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Named export.
    pub fn uri_named(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    pub fn size(&self) -> u64 {
        nbdinfo_size(&self.uri())
    }

    /// The daemon's state for failure messages: socket present?, log.
    pub fn context(&self) -> String {
        let log = self.stderr();
        let stray = if self.child.is_some() && (log.contains("SIGTERM") || log.contains("SIGINT")) {
            "\nNOTE: the daemon logged a signal that this test did not send: another process on the \
             machine signalled it (stray pkill/kill?), so the failure is not the daemon's own"
        } else {
            ""
        };
        format!("daemon socket {} exists: {}{stray}\n--- daemon stderr ---\n{log}", self.sock.display(), self.sock.exists())
    }

    /// SIGTERM and wait; returns the exit status (SIGKILL and panic if it does not exit).
    pub fn stop(mut self) -> ExitStatus {
        let st = self.terminate(libc::SIGTERM);
        match st {
            Some(st) => st,
            None => panic!("nbraid serve did not exit within {:?} of SIGTERM (killed)\n--- daemon stderr ---\n{}", EXIT_TIMEOUT, self.stderr()),
        }
    }

    /// Send `sig` (e.g. SIGINT) and wait; None if it had to be killed.
    pub fn signal_and_wait(mut self, sig: libc::c_int) -> Option<ExitStatus> {
        self.terminate(sig)
    }

    /// SIGTERM, and the exit status must be 0.
    pub fn stop_ok(self) {
        let log = self.log.clone();
        let st = self.stop();
        assert!(
            st.success(),
            "nbraid serve exited with {st} after SIGTERM (expected 0)\n--- daemon stderr ---\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// Wait (bounded) for the daemon to exit on its own, e.g. after refusing its members.
    pub fn wait_exit(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return (st, self.stderr());
            }
            if start.elapsed() > EXIT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nbraid serve was expected to exit by itself but kept running\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send `sig`, wait up to EXIT_TIMEOUT; on timeout SIGKILL and return None.
    fn terminate(&mut self, sig: libc::c_int) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if start.elapsed() > EXIT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, for crash tests.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate(libc::SIGTERM);
        }
    }
}

// ------------------------------------------------------------------------------------------
// clients

pub fn nbdinfo_size(uri: &str) -> u64 {
    let o = run_ok(Command::new(tool("nbdinfo")).arg("--size").arg(uri));
    let s = String::from_utf8_lossy(&o.stdout);
    s.trim().parse().unwrap_or_else(|_| panic!("nbdinfo --size {uri}: unexpected output {s:?}"))
}

/// Run qemu-io with the given `-c` commands against an NBD URI. Fails the test on a non-zero
/// exit, on "Pattern verification failed" or any error text, and when the number of
/// "wrote"/"read" result lines differs from the number of write/read commands (qemu-io can exit
/// 0 on a pattern mismatch).
pub fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.arg("-f").arg("raw").arg(uri);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let o = run(&mut c);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let all = format!("{out}\n{err}").to_lowercase();
    let summary = || {
        let shown: Vec<&String> = cmds.iter().take(60).collect();
        format!("qemu-io {uri}\ncommands: {shown:#?}\n{}", show(&o))
    };
    assert!(!all.contains("pattern verification failed"), "qemu-io: pattern verification failed\n{}", summary());
    for bad in ["error", "fail", "invalid", "no space", "input/output", "denied", "cannot", "broken pipe"] {
        assert!(!all.contains(bad), "qemu-io output contains {bad:?}\n{}", summary());
    }
    assert!(o.status.success(), "qemu-io exited non-zero\n{}", summary());
    let writes = cmds.iter().filter(|c| c.starts_with("write")).count();
    let reads = cmds.iter().filter(|c| c.starts_with("read")).count();
    let wrote = out.lines().filter(|l| l.starts_with("wrote ")).count();
    let read = out.lines().filter(|l| l.starts_with("read ")).count();
    assert_eq!((wrote, read), (writes, reads), "qemu-io did not complete every command\n{}", summary());
    out
}

pub fn nbdcopy(src: impl AsRef<std::ffi::OsStr>, dst: impl AsRef<std::ffi::OsStr>) {
    run_ok(Command::new(tool("nbdcopy")).arg(src.as_ref()).arg(dst.as_ref()));
}

pub fn sha256_file(p: &Path) -> String {
    sha256_prefix(p, u64::MAX)
}

/// sha256 of the first `len` bytes of a file (all of it if shorter).
pub fn sha256_prefix(p: &Path, len: u64) -> String {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut r = f.take(len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

pub fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A file of `len` pseudo-random bytes (seeded, so failures reproduce).
pub fn random_file(p: &Path, len: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = File::create(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

pub fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(p).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// XOR one byte of a file with `mask`; returns the old value.
pub fn flip_byte(p: &Path, off: u64, mask: u8) -> u8 {
    let mut f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = [0u8];
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&[b[0] ^ mask]).unwrap();
    f.sync_all().unwrap();
    b[0]
}

// ------------------------------------------------------------------------------------------
// a shadow model of written patterns, verified with qemu-io

/// What a byte range of the volume should hold. Writes are applied in order; `verify_cmds`
/// emits one `read -P` per run of equal bytes, so untouched neighbours are checked as zero.
pub struct Shadow {
    pub base: u64,
    pub bytes: Vec<u8>,
    pub writes: Vec<String>,
}

impl Shadow {
    pub fn new(base: u64, len: u64) -> Shadow {
        Shadow { base, bytes: vec![0; len as usize], writes: vec![] }
    }

    /// Record `write -P pat off len` (absolute volume offset).
    pub fn write(&mut self, off: u64, len: u64, pat: u8) {
        assert!(off >= self.base && off + len <= self.base + self.bytes.len() as u64, "shadow write out of model");
        let s = (off - self.base) as usize;
        self.bytes[s..s + len as usize].fill(pat);
        self.writes.push(format!("write -P 0x{pat:02x} {off} {len}"));
    }

    /// Record `write -f -P pat off len` (FUA: durable before it is acknowledged).
    pub fn write_fua(&mut self, off: u64, len: u64, pat: u8) {
        self.write(off, len, pat);
        self.writes.last_mut().unwrap().replace_range(0..5, "write -f");
    }

    /// Record `write -z off len` (NBD_CMD_WRITE_ZEROES where the server offers it).
    pub fn write_zeroes(&mut self, off: u64, len: u64) {
        self.write(off, len, 0);
        *self.writes.last_mut().unwrap() = format!("write -z {off} {len}");
    }

    pub fn verify_cmds(&self) -> Vec<String> {
        let mut v = vec![];
        let mut i = 0;
        while i < self.bytes.len() {
            let b = self.bytes[i];
            let mut j = i;
            while j < self.bytes.len() && self.bytes[j] == b {
                j += 1;
            }
            v.push(format!("read -P 0x{b:02x} {} {}", self.base + i as u64, j - i));
            i = j;
        }
        v
    }

    pub fn apply(&self, uri: &str) {
        qemu_io(uri, &self.writes);
    }

    pub fn verify(&self, uri: &str) {
        qemu_io(uri, &self.verify_cmds());
    }
}

// ------------------------------------------------------------------------------------------
// fio

/// Run fio with JSON output; fails the test on a non-zero exit, any job error, any verify
/// complaint, or when a job did no I/O. Returns the parsed JSON.
pub fn fio(args: &[String]) -> serde_json::Value {
    fio_ctx(args, &String::new)
}

/// `fio`, adding `extra()` (e.g. the daemon's stderr) to any failure message.
pub fn fio_ctx(args: &[String], extra: &dyn Fn() -> String) -> serde_json::Value {
    let mut c = Command::new(tool("fio"));
    c.arg("--verify_state_save=0");
    c.args(args).arg("--output-format=json");
    let o = run(&mut c);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let killed = {
        use std::os::unix::process::ExitStatusExt;
        match o.status.signal() {
            Some(sig) => format!("\nNOTE: fio itself died of signal {sig}, which this test never sends: another process on the machine killed it"),
            None => String::new(),
        }
    };
    let ctx = || format!("fio {:?}\n{}{killed}\n{}", args, show(&o), extra());
    judge_fio(o.status.success(), &out, &err, &ctx)
}

/// The verdict on a finished fio run: exit 0, no verify complaint on stderr, a JSON report whose
/// every job has error 0 and did some I/O. Returns the JSON.
pub fn judge_fio(success: bool, out: &str, err: &str, ctx: &dyn Fn() -> String) -> serde_json::Value {
    assert!(success, "fio exited non-zero\n{}", ctx());
    for bad in ["verify", "bad magic", "mismatch", "crc32c", "error", "fail"] {
        assert!(!err.to_lowercase().contains(bad), "fio stderr mentions {bad:?}\n{}", ctx());
    }
    // fio may print warnings before the JSON document
    let start = out.find('{').unwrap_or_else(|| panic!("fio printed no JSON\n{}", ctx()));
    let v: serde_json::Value = serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("fio JSON: {e}\n{}", ctx()));
    let jobs = v["jobs"].as_array().unwrap_or_else(|| panic!("fio JSON without jobs\n{}", ctx()));
    assert!(!jobs.is_empty(), "fio ran no job\n{}", ctx());
    for j in jobs {
        assert_eq!(j["error"].as_i64(), Some(0), "fio job {} reported error\n{}", j["jobname"], ctx());
        let io = j["read"]["io_bytes"].as_u64().unwrap_or(0) + j["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(io > 0, "fio job {} did no I/O\n{}", j["jobname"], ctx());
    }
    v
}

pub fn fio_bytes(v: &serde_json::Value, dir: &str) -> u64 {
    v["jobs"].as_array().unwrap().iter().map(|j| j[dir]["io_bytes"].as_u64().unwrap_or(0)).sum()
}

// ------------------------------------------------------------------------------------------
// a filesystem on the volume without the kernel nbd module: nbdfuse + losetup + mount

/// `nbdfuse DIR --unix SOCK` in the background; the export appears as `DIR/nbd`.
pub struct Fuse {
    child: Option<Child>,
    pub dir: PathBuf,
    log: PathBuf,
}

impl Fuse {
    pub fn start(dir: &Path, sock: &Path, log: &Path) -> Fuse {
        fs::create_dir_all(dir).unwrap();
        let errf = File::create(log).unwrap();
        let child = Command::new(tool("nbdfuse"))
            .arg(dir)
            .arg("--unix")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(errf.try_clone().unwrap())
            .stderr(errf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nbdfuse: {e}"));
        let mut f = Fuse { child: Some(child), dir: dir.to_path_buf(), log: log.to_path_buf() };
        let start = Instant::now();
        loop {
            if let Some(st) = f.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdfuse exited early ({st})\n{}", fs::read_to_string(&f.log).unwrap_or_default());
            }
            if f.dir.join("nbd").exists() {
                break;
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!("nbdfuse: {}/nbd did not appear\n{}", f.dir.display(), fs::read_to_string(&f.log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    /// Unmount and wait for nbdfuse to exit (it flushes and disconnects first).
    pub fn stop(mut self) {
        self.teardown(true);
    }

    fn teardown(&mut self, strict: bool) {
        let Some(mut child) = self.child.take() else { return };
        let o = Command::new("fusermount3").arg("-u").arg(&self.dir).stdin(Stdio::null()).output();
        if !matches!(&o, Ok(o) if o.status.success()) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).output();
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if start.elapsed() > EXIT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).output();
                if strict {
                    panic!("nbdfuse did not exit after fusermount3 -u (killed)");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        self.teardown(false);
    }
}

/// `losetup -f --show FILE`, detached on drop.
pub struct Loop {
    pub dev: Option<String>,
}

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        let o = run_ok(Command::new(tool("losetup")).arg("-f").arg("--show").arg(file));
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev: Some(dev) }
    }

    pub fn dev(&self) -> &str {
        self.dev.as_deref().unwrap()
    }

    pub fn detach(mut self) {
        let dev = self.dev.take().unwrap();
        run_ok(Command::new(tool("losetup")).arg("-d").arg(&dev));
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).output();
        }
    }
}

/// `mount DEV DIR`, unmounted on drop (with `umount -l` as the fallback).
pub struct Mount {
    pub dir: Option<PathBuf>,
}

impl Mount {
    pub fn new(dev: &str, dir: &Path) -> Mount {
        fs::create_dir_all(dir).unwrap();
        run_ok(Command::new(tool("mount")).arg(dev).arg(dir));
        Mount { dir: Some(dir.to_path_buf()) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_deref().unwrap()
    }

    pub fn umount(mut self) {
        let d = self.dir.take().unwrap();
        run_ok(Command::new(tool("umount")).arg(&d));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            let ok = Command::new("umount").arg(&d).output().map(|o| o.status.success()).unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&d).output();
            }
        }
    }
}

/// The stack a filesystem test builds: fields drop in declaration order, i.e. umount, then
/// losetup -d, then fusermount3 -u. The daemon is owned by the test and dropped after this.
pub struct MountedVolume {
    pub mount: Option<Mount>,
    pub lo: Option<Loop>,
    pub fuse: Option<Fuse>,
}

impl MountedVolume {
    /// Attach the daemon's export through nbdfuse and a loop device; `mkfs` formats it first.
    pub fn new(dir: &TestDir, sock: &Path, tag: &str, mkfs: bool) -> MountedVolume {
        let fuse = Fuse::start(&dir.join(format!("fuse-{tag}")), sock, &dir.join(format!("nbdfuse-{tag}.log")));
        let mut mv = MountedVolume { mount: None, lo: None, fuse: Some(fuse) };
        let lo = Loop::attach(&mv.fuse.as_ref().unwrap().file());
        mv.lo = Some(lo);
        let dev = mv.lo.as_ref().unwrap().dev().to_string();
        if mkfs {
            run_ok(Command::new(tool("mkfs.ext4")).arg("-q").arg("-F").arg(&dev));
        }
        mv.mount = Some(Mount::new(&dev, &dir.join(format!("mnt-{tag}"))));
        mv
    }

    pub fn path(&self) -> &Path {
        self.mount.as_ref().unwrap().path()
    }

    /// Orderly teardown that fails the test if any step fails.
    pub fn unmount(mut self) {
        run_ok(&mut Command::new(tool("sync")));
        self.mount.take().unwrap().umount();
        self.lo.take().unwrap().detach();
        self.fuse.take().unwrap().stop();
    }
}

// ------------------------------------------------------------------------------------------
// file trees

/// Relative path -> sha256 of every regular file under `root`.
pub fn tree_hashes(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut m = BTreeMap::new();
    fn walk(root: &Path, d: &Path, m: &mut BTreeMap<PathBuf, String>) {
        let mut ents: Vec<_> = fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        ents.sort();
        for p in ents {
            let ft = fs::symlink_metadata(&p).unwrap().file_type();
            if ft.is_dir() {
                if p.file_name().map(|n| n == "lost+found").unwrap_or(false) {
                    continue;
                }
                walk(root, &p, m);
            } else if ft.is_file() {
                m.insert(p.strip_prefix(root).unwrap().to_path_buf(), sha256_file(&p));
            }
        }
    }
    walk(root, root, &mut m);
    m
}

/// Copy a directory tree (regular files and dirs).
pub fn copy_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let t = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&p, &t);
        } else {
            fs::copy(&p, &t).unwrap_or_else(|err| panic!("copy {} -> {}: {err}", p.display(), t.display()));
        }
    }
}

/// Shuffled copy of `v` guaranteed to differ from `v` (for n > 1).
pub fn shuffled<T: Clone + PartialEq>(v: &[T], seed: u64) -> Vec<T> {
    use rand::seq::SliceRandom;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut s = v.to_vec();
    if v.len() < 2 {
        return s;
    }
    loop {
        s.shuffle(&mut rng);
        if s != v {
            return s;
        }
    }
}

pub fn round_up(x: u64, m: u64) -> u64 {
    x.div_ceil(m) * m
}

/// First offset where two files differ (or where one ends), for failure messages.
pub fn first_diff(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        let n = na.min(nb);
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Some(off + i as u64);
        }
        if na != nb {
            return Some(off + n as u64);
        }
        if na == 0 {
            return None;
        }
        off += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Assert two files are byte-identical (sha256), naming the first differing offset.
pub fn assert_same_file(got: &Path, want: &Path, what: &str) {
    let (g, w) = (sha256_file(got), sha256_file(want));
    if g != w {
        panic!("{what}: sha256 differs ({} {g} vs {} {w}); first difference at byte {:?}", got.display(), want.display(), first_diff(got, want));
    }
}

// ------------------------------------------------------------------------------------------
// a reference server, for testing the harness itself

/// `nbdkit -f --unix SOCK PLUGIN ARGS...`, killed on drop.
pub struct Nbdkit {
    child: Option<Child>,
    pub sock: PathBuf,
}

impl Nbdkit {
    pub fn start(dir: &TestDir, args: &[&str]) -> Nbdkit {
        let sock = dir.join(format!("kit{}.sock", unique()));
        let log = dir.join("nbdkit.log");
        let errf = File::create(&log).unwrap();
        let child = Command::new(tool("nbdkit"))
            .arg("-f")
            .arg("--unix")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(errf.try_clone().unwrap())
            .stderr(errf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nbdkit: {e}"));
        let mut k = Nbdkit { child: Some(child), sock };
        let start = Instant::now();
        while !(k.sock.exists() && UnixStream::connect(&k.sock).is_ok()) {
            if let Some(st) = k.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdkit exited ({st}): {}", fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(start.elapsed() < READY_TIMEOUT, "nbdkit not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        k
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let start = Instant::now();
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if start.elapsed() > EXIT_TIMEOUT {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Did the closure panic? (For tests of the harness: a check must be able to fail.)
pub fn panics<F: FnOnce() + std::panic::UnwindSafe>(f: F) -> bool {
    std::panic::catch_unwind(f).is_err()
}

pub fn is_mounted(dir: &Path) -> bool {
    let m = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let d = dir.to_string_lossy().to_string();
    m.lines().any(|l| l.split_whitespace().nth(1) == Some(d.as_str()))
}

/// Loop devices backed by `file` (`losetup -j FILE`).
pub fn loops_for(file: &Path) -> String {
    let o = run(Command::new(tool("losetup")).arg("-a"));
    let f = file.to_string_lossy().to_string();
    String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains(&f)).collect::<Vec<_>>().join("\n")
}

/// A member file whose I/O fails on command: `nbdkit --filter=error file BACKING` exported as a
/// file through nbdfuse. While `trigger` exists every request to it returns EIO. The backing
/// file can also be edited directly (silent corruption).
pub struct FaultyMember {
    // drop order: nbdfuse first, then nbdkit
    pub fuse: Fuse,
    pub kit: Nbdkit,
    pub backing: PathBuf,
    pub trigger: PathBuf,
}

impl FaultyMember {
    pub fn new(dir: &TestDir, tag: &str, size: u64) -> FaultyMember {
        let backing = dir.join(format!("{tag}.img"));
        let f = File::create(&backing).unwrap();
        f.set_len(size).unwrap();
        let trigger = dir.join(format!("{tag}.FAIL"));
        let kit = Nbdkit::start(
            dir,
            &["--filter=error", "file", backing.to_str().unwrap(), "error=EIO", "error-rate=100%", &format!("error-file={}", trigger.display())],
        );
        let fuse = Fuse::start(&dir.join(format!("{tag}-fuse")), &kit.sock, &dir.join(format!("{tag}-nbdfuse.log")));
        FaultyMember { fuse, kit, backing, trigger }
    }

    /// The path to give nbraid as the member.
    pub fn path(&self) -> PathBuf {
        self.fuse.file()
    }

    pub fn fail(&self) {
        File::create(&self.trigger).unwrap();
    }

    pub fn heal(&self) {
        let _ = fs::remove_file(&self.trigger);
    }
}

/// `nbraid status --control CTL --json`.
pub fn status_json(ctl: &Path) -> serde_json::Value {
    let o = run_ok(nbraid().arg("status").arg("--control").arg(ctl).arg("--json"));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{}", show(&o)))
}

/// `nbraid SUBCOMMAND --control CTL ARGS...`, which must succeed.
pub fn ctl_cmd(sub: &str, ctl: &Path, args: &[&std::ffi::OsStr]) -> Output {
    run_ok(nbraid().arg(sub).arg("--control").arg(ctl).args(args))
}
