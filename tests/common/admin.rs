//! Helpers for tests that drive a running daemon through its control socket: `nbraid status`,
//! `fail`, `add`, `replace`, `rebuild`, `fault`; polling the status; fio in the background;
//! whole-volume hashes.
//!
//! Every wait here is a hang guard only (a generous bound that panics with the last status); no
//! test asserts on elapsed time.
#![allow(dead_code)]

use super::*;
use serde_json::Value;

/// Hang guard for rebuilds and other state changes the daemon must reach.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(240);
/// Hang guard for a background fio run.
pub const FIO_TIMEOUT: Duration = Duration::from_secs(300);

/// A fresh control socket path in the test directory.
pub fn ctl_path(dir: &TestDir) -> PathBuf {
    dir.join(format!("ctl{}.sock", unique()))
}

/// `serve --control CTL --allow-fault-injection MEMBERS...`; waits until `status` answers.
pub fn start_admin(dir: &TestDir, members: &[PathBuf]) -> (Daemon, PathBuf) {
    start_admin_with(dir, members, true)
}

pub fn start_admin_with(dir: &TestDir, members: &[PathBuf], faults: bool) -> (Daemon, PathBuf) {
    let ctl = ctl_path(dir);
    let ctl_s = ctl.to_str().unwrap().to_string();
    let mut extra = vec!["--control", ctl_s.as_str()];
    if faults {
        extra.push("--allow-fault-injection");
    }
    let mut d = Daemon::start_with(dir, members, &extra);
    let start = Instant::now();
    loop {
        let o = admin(&ctl, &["status", "--json"]);
        if o.status.success() {
            break;
        }
        assert!(d.is_running(), "daemon exited before its control socket answered\n{}", d.context());
        assert!(start.elapsed() < READY_TIMEOUT, "control socket {} never answered `status`\n{}\n{}", ctl.display(), show(&o), d.context());
        std::thread::sleep(Duration::from_millis(50));
    }
    (d, ctl)
}

/// `nbraid SUB --control CTL REST...` (args[0] is the subcommand).
pub fn admin(ctl: &Path, args: &[&str]) -> Output {
    let mut c = nbraid();
    c.arg(args[0]).arg("--control").arg(ctl).args(&args[1..]);
    run(&mut c)
}

/// An admin command that must exit 0; returns its stdout.
pub fn admin_ok(ctl: &Path, args: &[&str]) -> String {
    let o = admin(ctl, args);
    assert!(o.status.success(), "`nbraid {}` failed\n{}", args.join(" "), show(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// An admin command that must be refused: non-zero exit and a message on stderr. Returns the
/// message.
pub fn admin_refused(ctl: &Path, args: &[&str]) -> String {
    let o = admin(ctl, args);
    assert!(!o.status.success(), "`nbraid {}` should have been refused\n{}", args.join(" "), show(&o));
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert!(!err.is_empty(), "`nbraid {}` was refused without a message on stderr\n{}", args.join(" "), show(&o));
    err
}

/// `nbraid status --json`, parsed.
pub fn status(ctl: &Path) -> Value {
    let out = admin_ok(ctl, &["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

pub fn vol_state(v: &Value) -> String {
    v["state"].as_str().unwrap_or_else(|| panic!("status without a state: {v:#}")).to_string()
}

/// Each slot's `state`, in slot order.
pub fn slot_states(v: &Value) -> Vec<String> {
    slots(v).iter().map(|s| s["state"].as_str().unwrap_or("?").to_string()).collect()
}

/// Each slot's `path` ("" when none), in slot order.
pub fn slot_paths(v: &Value) -> Vec<String> {
    slots(v).iter().map(|s| s["path"].as_str().unwrap_or("").to_string()).collect()
}

pub fn slots(v: &Value) -> Vec<Value> {
    let mut s = v["slots"].as_array().unwrap_or_else(|| panic!("status without slots: {v:#}")).clone();
    s.sort_by_key(|x| x["slot"].as_u64());
    s
}

pub fn spares(v: &Value) -> Vec<String> {
    v["spares"].as_array().unwrap_or_else(|| panic!("status without spares: {v:#}")).iter().map(|s| s.as_str().unwrap_or("").to_string()).collect()
}

/// The `rebuilds[]` entry for `slot`, if one is running.
pub fn rebuild_of(v: &Value, slot: u64) -> Option<Value> {
    v["rebuilds"].as_array()?.iter().find(|r| r["slot"].as_u64() == Some(slot)).cloned()
}

/// Polls `status` until `pred` holds; panics after WAIT_TIMEOUT showing the last status.
pub fn wait_status(ctl: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = status(ctl);
        if pred(&v) {
            return v;
        }
        if start.elapsed() > WAIT_TIMEOUT {
            panic!("gave up waiting for {what} (hang guard {WAIT_TIMEOUT:?}); last status:\n{v:#}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait_optimal(ctl: &Path) -> Value {
    wait_status(ctl, "state optimal", |v| vol_state(v) == "optimal" && v["rebuilds"].as_array().is_none_or(|r| r.is_empty()))
}

/// Asserts the volume state and slot states, with the whole status on failure.
pub fn assert_status(v: &Value, state: &str, slot_states_want: &[&str], what: &str) {
    let got: Vec<String> = slot_states(v);
    assert!(
        vol_state(v) == state && got == slot_states_want,
        "{what}: expected state {state} with slots {slot_states_want:?}, got {} with {got:?}\n{v:#}",
        vol_state(v)
    );
}

/// A blank member file of `size` bytes (sparse, so `add` sees no data in it).
pub fn blank_member(p: &Path, size: u64) {
    let f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.set_len(size).unwrap();
}

/// sha256 of the whole exported volume, read with nbdcopy into a scratch file (removed after).
pub fn volume_sha(dir: &TestDir, uri: &str) -> String {
    let out = dir.join(format!("vol{}.img", unique()));
    nbdcopy(uri, &out);
    let h = sha256_file(&out);
    fs::remove_file(&out).unwrap();
    h
}

/// The whole exported volume into `out` (for byte comparisons).
pub fn volume_to(uri: &str, out: &Path) {
    let _ = fs::remove_file(out);
    nbdcopy(uri, out);
}

// ------------------------------------------------------------------------------------------
// fio

/// `--name=v --ioengine=nbd --uri=URI --verify_state_save=0 EXTRA...` (no verify state file
/// is left in the working directory).
pub fn fio_nbd(uri: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--name=v".to_string(), "--ioengine=nbd".into(), format!("--uri={uri}"), "--verify_state_save=0".into()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The same job with `--verify_only` added (re-reads and checks what the job wrote).
pub fn verify_only(args: &[String]) -> Vec<String> {
    let mut v = args.to_vec();
    v.push("--verify_only".into());
    v
}

/// fio running in the background, JSON on stdout into a file; killed on drop.
pub struct BgFio {
    child: Option<Child>,
    pub args: Vec<String>,
    out: PathBuf,
    err: PathBuf,
}

impl BgFio {
    pub fn spawn(dir: &TestDir, args: &[String]) -> BgFio {
        let n = unique();
        let out = dir.join(format!("fio{n}.json"));
        let err = dir.join(format!("fio{n}.err"));
        let child = Command::new(tool("fio"))
            .args(args)
            .arg("--output-format=json")
            .current_dir(&dir.path) // a verify state file, if any, stays in the test dir
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn fio: {e}"));
        BgFio { child: Some(child), args: args.to_vec(), out, err }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn wait(&mut self) -> (ExitStatus, String, String) {
        let mut child = self.child.take().expect("fio already waited for");
        let start = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > FIO_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("background fio {:?} did not finish within {FIO_TIMEOUT:?} (killed)\n{}", self.args, fs::read_to_string(&self.err).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (st, fs::read_to_string(&self.out).unwrap_or_default(), fs::read_to_string(&self.err).unwrap_or_default())
    }

    /// Waits and applies the same checks as `fio_ctx`: exit 0, no verify complaint, every job
    /// error 0 and some I/O done. Returns the JSON.
    pub fn finish(mut self, extra: &dyn Fn() -> String) -> Value {
        let (st, out, err) = self.wait();
        let ctx = || format!("background fio {:?}\nstatus: {st}\n--- stdout ---\n{out}\n--- stderr ---\n{err}\n{}", self.args, extra());
        judge_fio(st.success(), &out, &err, &ctx)
    }

    /// Waits; returns (exit status, stdout, stderr) without judging them.
    pub fn finish_any(mut self) -> (ExitStatus, String, String) {
        self.wait()
    }
}

impl Drop for BgFio {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// fio run to completion that is expected to fail (the volume lost too much); returns
/// (exit status, stdout+stderr).
pub fn fio_expect_failure(args: &[String]) -> (ExitStatus, String) {
    let mut c = Command::new(tool("fio"));
    c.args(args).arg("--output-format=json").current_dir(std::env::temp_dir());
    let o = run(&mut c);
    (o.status, format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// qemu-io with `-c` commands, not judged (for requests that are expected to fail).
pub fn qemu_io_raw(uri: &str, cmds: &[String]) -> Output {
    let mut c = Command::new(tool("qemu-io"));
    c.arg("-f").arg("raw").arg(uri);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(&mut c)
}
