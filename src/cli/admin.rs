//! Admin subcommands that talk to a running daemon over its control socket: `status`, `fail`,
//! `add`, `replace`, `rebuild` and the hidden test hook `fault`.

use super::size::{format_size, parse_size};
use crate::control::api::{FaultSpec, RebuildStatus, Request, Response, VolumeState, VolumeStatus};
use crate::control::client::{self, Client};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often `--wait` asks the daemon for progress.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often `--wait` prints a plain progress line when stdout is not a terminal.
const PLAIN_INTERVAL: Duration = Duration::from_secs(3);
/// How long `--wait` keeps looking for a rebuild to appear on a degraded volume, in case the
/// daemon starts it just after answering.
const START_GRACE: Duration = Duration::from_secs(2);

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Show a running volume: state, slots with I/O and error counters, spares, rebuilds.
    Status(StatusArgs),
    /// Mark a member failed; the volume goes on degraded where redundancy allows.
    Fail(FailArgs),
    /// Add a member: it fills a failed slot (and is rebuilt) or waits as a hot spare.
    Add(AddArgs),
    /// Rebuild NEW from the others while OLD keeps serving, then retire OLD.
    Replace(ReplaceArgs),
    /// Set the rebuild throttle, and/or wait for running rebuilds to finish.
    Rebuild(RebuildArgs),
    /// Verify every stripe's parity or mirror copies on the running volume; --repair rewrites
    /// what disagrees.
    Scrub(ScrubArgs),
    /// Test hook: inject faults into a member's I/O (the daemon must allow it).
    #[command(hide = true)]
    Fault(FaultArgs),
}

#[derive(clap::Args, Debug)]
pub struct ScrubArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Rewrite inconsistent stripes (parity recomputed from the data; raid1: slot 0's copy).
    #[arg(long)]
    repair: bool,
    /// Limit member reads to this many bytes per second, like 100MiB/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate_arg)]
    max_rate: Option<Rate>,
    /// Wait for the scrub to finish and print its summary; exit 1 if it left inconsistencies.
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args, Debug)]
pub struct ControlArg {
    /// The daemon's control socket, as given to `nbraid serve --control PATH`.
    /// Required: there is no default, so a command never reaches a daemon by accident.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct WaitArg {
    /// Wait until no rebuild is running, showing progress; exit 0 only if the volume ends up
    /// optimal.
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Print the daemon's status as JSON (the `VolumeStatus` object), for scripts and jq.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct FailArgs {
    #[command(flatten)]
    control: ControlArg,
    /// The member: its path as the daemon knows it, or its slot number.
    member: String,
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    #[command(flatten)]
    control: ControlArg,
    #[command(flatten)]
    wait: WaitArg,
    /// The new member's file or block device (sent as an absolute path).
    path: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct ReplaceArgs {
    #[command(flatten)]
    control: ControlArg,
    #[command(flatten)]
    wait: WaitArg,
    /// The member to retire: its path as the daemon knows it, or its slot number.
    old: String,
    /// The file or block device to take its place (sent as an absolute path).
    new: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RebuildArgs {
    #[command(flatten)]
    control: ControlArg,
    #[command(flatten)]
    wait: WaitArg,
    /// Rebuild throttle in bytes per second written to the new member, like 200MiB/s or 50MiB;
    /// 0 or `unlimited` lifts it. Without it, nothing is changed (use with --wait to watch).
    #[arg(long, value_name = "RATE", value_parser = parse_rate_arg)]
    max_rate: Option<Rate>,
}

#[derive(clap::Args, Debug)]
pub struct FaultArgs {
    #[command(flatten)]
    control: ControlArg,
    /// The member: its path as the daemon knows it, or its slot number.
    member: String,
    /// Fail reads with EIO.
    #[arg(long)]
    read_errors: bool,
    /// Fail writes and flushes with EIO.
    #[arg(long)]
    write_errors: bool,
    /// Let this many operations through before faulting.
    #[arg(long, value_name = "N", default_value_t = 0)]
    after: u64,
    /// Delay every operation by this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// After --after writes, the next write to the member persists only its first half and
    /// the daemon dies on the spot (a power cut mid-write).
    #[arg(long)]
    torn_write: bool,
    /// Remove every fault from the member.
    #[arg(long, conflicts_with_all = ["read_errors", "write_errors", "after", "delay_ms", "torn_write"])]
    clear: bool,
}

/// A parsed `--max-rate`: `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub Option<u64>);

fn parse_rate_arg(s: &str) -> Result<Rate, String> {
    parse_rate(s).map(Rate)
}

/// Parses a rebuild rate: a size with an optional `/s` (`200MiB/s`, `50MiB`, `1048576`);
/// `0`, `unlimited` or `none` mean no throttle (`None`).
pub fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let size = t.strip_suffix("/s").unwrap_or(t);
    let n = parse_size(size).map_err(|e| format!("invalid rate {s:?}: {e}; use e.g. 200MiB/s, or 0 / unlimited"))?;
    Ok(if n == 0 { None } else { Some(n) })
}

/// Runs one admin subcommand; returns the process exit code.
pub async fn run(cmd: AdminCommand) -> Result<i32, String> {
    match cmd {
        AdminCommand::Status(args) => status(args).await,
        AdminCommand::Fail(args) => simple(&args.control.control, Request::Fail { member: args.member }).await,
        AdminCommand::Add(args) => {
            let path = absolute(&args.path)?;
            let resp = request(&args.control.control, &Request::Add { path }).await?;
            finish(&args.control.control, resp, args.wait.wait).await
        }
        AdminCommand::Replace(args) => {
            let new = absolute(&args.new)?;
            let resp = request(&args.control.control, &Request::Replace { old: args.old, new }).await?;
            finish(&args.control.control, resp, args.wait.wait).await
        }
        AdminCommand::Rebuild(args) => match args.max_rate {
            Some(Rate(max_rate)) => {
                let resp = request(&args.control.control, &Request::Rebuild { max_rate }).await?;
                finish(&args.control.control, resp, args.wait.wait).await
            }
            // Sending `Rebuild { max_rate: None }` would silently lift a throttle the admin set,
            // so a bare `rebuild --wait` only watches.
            None if args.wait.wait => wait_for_rebuilds(&args.control.control).await,
            None => Err("nothing to do: give --max-rate RATE (0 or unlimited lifts the throttle), or --wait to watch rebuilds".into()),
        },
        AdminCommand::Scrub(args) => {
            let max_rate = args.max_rate.and_then(|r| r.0);
            let resp = request(&args.control.control, &Request::Scrub { repair: args.repair, max_rate }).await?;
            print_message(&resp);
            if args.wait {
                wait_for_scrub(&args.control.control).await
            } else {
                Ok(0)
            }
        }
        AdminCommand::Fault(args) => {
            if !args.clear && !args.read_errors && !args.write_errors && args.delay_ms == 0 && !args.torn_write {
                return Err("no fault given: use --read-errors, --write-errors or --delay-ms MS, --torn-write, or --clear".into());
            }
            let fault = if args.clear {
                FaultSpec::default()
            } else {
                FaultSpec {
                    read_errors: args.read_errors,
                    write_errors: args.write_errors,
                    after_ops: args.after,
                    delay_ms: args.delay_ms,
                    torn_write: args.torn_write,
                }
            };
            simple(&args.control.control, Request::Fault { member: args.member, fault }).await
        }
    }
}

/// Sends a request; a refusal becomes the error that `main` prints as `nbraid: error: ...`.
async fn request(control: &Path, req: &Request) -> Result<Response, String> {
    let resp = client::call(control, req).await.map_err(|e| e.to_string())?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(resp.message)
    }
}

async fn simple(control: &Path, req: Request) -> Result<i32, String> {
    let resp = request(control, &req).await?;
    print_message(&resp);
    Ok(0)
}

async fn finish(control: &Path, resp: Response, wait: bool) -> Result<i32, String> {
    print_message(&resp);
    if wait {
        wait_for_rebuilds(control).await
    } else {
        Ok(0)
    }
}

fn print_message(resp: &Response) {
    if !resp.message.is_empty() {
        println!("{}", resp.message);
    }
}

async fn status(args: StatusArgs) -> Result<i32, String> {
    let resp = request(&args.control.control, &Request::Status).await?;
    let Some(status) = resp.status else {
        return Err(format!("the daemon answered without a status: {}", resp.message));
    };
    if args.json {
        let json = serde_json::to_string_pretty(&status).map_err(|e| format!("cannot encode the status as JSON: {e}"))?;
        println!("{json}");
    } else {
        print!("{}", format_status(&status));
    }
    Ok(0)
}

/// Makes a member path absolute without resolving the member itself: the daemon's working
/// directory may differ from ours, but a symlink such as `/dev/disk/by-id/...` is kept as the
/// stable name the admin chose.
fn absolute(path: &Path) -> Result<PathBuf, String> {
    let name = path.file_name().ok_or_else(|| format!("{} does not name a file", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = parent.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", parent.display()))?;
    Ok(parent.join(name))
}

/// Polls the daemon until the scrub finishes, then prints its summary; exit 1 if stripes were
/// left inconsistent or the scrub stopped early.
async fn wait_for_scrub(control: &Path) -> Result<i32, String> {
    let mut client = Client::connect(control).await.map_err(|e| e.to_string())?;
    let mut last_line = Instant::now();
    loop {
        let resp = client.request(&Request::Status).await.map_err(|e| e.to_string())?;
        let scrub = resp.status.and_then(|s| s.scrub).ok_or("the daemon reports no scrub")?;
        if !scrub.running {
            println!("{}", format_scrub(&scrub));
            // Clean: nothing found, or (repairing) everything found was fixed.
            let found = scrub.mismatches + scrub.checksum_errors;
            let clean = scrub.error.is_none() && scrub.unrepairable == 0 && scrub.skipped == 0 && (found == 0 || (scrub.repair && scrub.repaired >= found));
            return Ok(if clean { 0 } else { 1 });
        }
        if last_line.elapsed() >= PLAIN_INTERVAL {
            println!(
                "scrub: {}/{} stripes, {} checksum errors, {} inconsistent stripes so far",
                scrub.stripes_done, scrub.stripes_total, scrub.checksum_errors, scrub.mismatches
            );
            last_line = Instant::now();
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// One line summing up a scrub.
pub fn format_scrub(s: &crate::control::api::ScrubStatus) -> String {
    let state = if s.running {
        "running"
    } else if s.error.is_some() {
        "stopped"
    } else {
        "finished"
    };
    let mut line = format!(
        "scrub {state}{}: {}/{} stripes, {} read, {} blocks checked, {} checksum errors, {} inconsistent stripes, {} repaired, {} unrepairable, {} skipped (lost member)",
        if s.repair { " (repair)" } else { "" },
        s.stripes_done,
        s.stripes_total,
        format_size(s.bytes_checked),
        s.blocks_checked,
        s.checksum_errors,
        s.mismatches,
        s.repaired,
        s.unrepairable,
        s.skipped
    );
    if let Some(e) = &s.error {
        let _ = write!(line, "; stopped: {e}");
    }
    line
}

/// Polls the daemon until no rebuild is running, drawing progress; the exit code says whether
/// the volume ended up optimal.
async fn wait_for_rebuilds(control: &Path) -> Result<i32, String> {
    let mut client = Client::connect(control).await.map_err(|e| e.to_string())?;
    let mut display = Progress::new(std::io::stdout().is_terminal());
    let started = Instant::now();
    let mut saw_rebuild = false;
    let status = loop {
        let resp = client.request(&Request::Status).await.map_err(|e| e.to_string())?;
        if !resp.ok {
            return Err(resp.message);
        }
        let Some(status) = resp.status else {
            return Err(format!("the daemon answered without a status: {}", resp.message));
        };
        let running = !status.rebuilds.is_empty() || status.state == VolumeState::Rebuilding;
        saw_rebuild |= running;
        let may_still_start = !saw_rebuild && status.state == VolumeState::Degraded && started.elapsed() < START_GRACE;
        if !running && !may_still_start {
            break status;
        }
        display.update(&status.rebuilds);
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    display.finish();
    match status.state {
        VolumeState::Optimal => {
            println!("volume {} is optimal", status.name);
            Ok(0)
        }
        state => {
            let failed: Vec<String> = status.slots.iter().filter(|s| s.state != "active").map(|s| format!("slot {} {}", s.slot, s.state)).collect();
            Err(format!("no rebuild running, but volume {} is {} ({})", status.name, state_name(state), failed.join(", ")))
        }
    }
}

/// One bar per running rebuild, keyed by (slot, target).
type Bars = (MultiProgress, BTreeMap<(u32, String), ProgressBar>);

/// Progress of the running rebuilds: bars on a terminal, otherwise a plain line now and then.
struct Progress {
    bars: Option<Bars>,
    last_plain: Option<Instant>,
    /// Rebuilds shown in plain mode, to report each one's end.
    plain_seen: Vec<(u32, String)>,
    drew_bars: bool,
}

impl Progress {
    fn new(terminal: bool) -> Progress {
        let bars = terminal.then(|| (MultiProgress::with_draw_target(ProgressDrawTarget::stdout()), BTreeMap::new()));
        Progress { bars, last_plain: None, plain_seen: Vec::new(), drew_bars: false }
    }

    fn update(&mut self, rebuilds: &[RebuildStatus]) {
        let Some((multi, bars)) = &mut self.bars else {
            for (slot, target) in &self.plain_seen {
                if !rebuilds.iter().any(|r| (r.slot, &r.target) == (*slot, target)) {
                    println!("rebuild slot {slot} -> {target}: done");
                }
            }
            self.plain_seen = rebuilds.iter().map(|r| (r.slot, r.target.clone())).collect();
            if self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_INTERVAL) {
                for r in rebuilds {
                    println!("{}", rebuild_line(r));
                }
                self.last_plain = Some(Instant::now());
            }
            return;
        };
        let style = ProgressStyle::with_template("{prefix} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        self.drew_bars |= !rebuilds.is_empty();
        for r in rebuilds {
            let bar = bars.entry((r.slot, r.target.clone())).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(r.total_bytes));
                bar.set_style(style.clone());
                bar.set_prefix(format!("slot {} -> {}", r.slot, r.target));
                bar
            });
            bar.set_length(r.total_bytes);
            bar.set_position(r.done_bytes.min(r.total_bytes));
            bar.set_message(format!("{}, ETA {}", format_rate(r.rate), format_eta(r.eta_seconds)));
        }
        // Rebuilds that ended since the last poll.
        bars.retain(|key, bar| {
            let live = rebuilds.iter().any(|r| (r.slot, &r.target) == (key.0, &key.1));
            if !live {
                bar.finish_with_message("done");
            }
            live
        });
    }

    fn finish(mut self) {
        // Reports (plain) or finishes (bars) every rebuild still shown.
        self.update(&[]);
        if self.drew_bars {
            // indicatif leaves the cursor at the end of the last bar.
            println!();
        }
    }
}

fn state_name(state: VolumeState) -> &'static str {
    match state {
        VolumeState::Optimal => "optimal",
        VolumeState::Degraded => "degraded",
        VolumeState::Rebuilding => "rebuilding",
        VolumeState::Failed => "failed",
    }
}

fn percent(r: &RebuildStatus) -> f64 {
    if r.total_bytes == 0 {
        100.0
    } else {
        (r.done_bytes as f64 / r.total_bytes as f64 * 100.0).clamp(0.0, 100.0)
    }
}

fn rebuild_line(r: &RebuildStatus) -> String {
    format!(
        "rebuild slot {} -> {}: {:.1}% ({} / {}), {}, ETA {}",
        r.slot,
        r.target,
        percent(r),
        format_size(r.done_bytes),
        format_size(r.total_bytes),
        format_rate(r.rate),
        format_eta(r.eta_seconds)
    )
}

/// A rate in MiB/s; the daemon's number is trusted only as far as being finite and positive.
fn format_rate(bytes_per_sec: f64) -> String {
    let mib = if bytes_per_sec.is_finite() && bytes_per_sec > 0.0 { bytes_per_sec / (1u64 << 20) as f64 } else { 0.0 };
    format!("{mib:.1} MiB/s")
}

fn format_eta(eta: Option<f64>) -> String {
    match eta {
        Some(s) if s.is_finite() && s >= 0.0 => {
            // Saturating float-to-int cast: absurd ETAs print large, never panic.
            let s = s.round() as u64;
            let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
            if h > 0 {
                format!("{h}h{m:02}m")
            } else if m > 0 {
                format!("{m}m{sec:02}s")
            } else {
                format!("{sec}s")
            }
        }
        _ => "unknown".into(),
    }
}

/// The human `status` output.
pub fn format_status(st: &VolumeStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "volume {} ({}): {} {}+{}, chunk {}, size {}, {} members: {}",
        st.name,
        st.uuid,
        st.level,
        st.data_shards,
        st.parity_shards,
        format_size(st.chunk),
        format_size(st.size),
        st.members,
        state_name(st.state)
    );

    let header = ["SLOT", "STATE", "PATH", "READS", "WRITES", "READ-ERR", "WRITE-ERR", "CSUM-ERR", "HEALED", "REPLACEMENT"];
    let rows: Vec<[String; 10]> = st
        .slots
        .iter()
        .map(|s| {
            [
                s.slot.to_string(),
                s.state.clone(),
                s.path.clone().unwrap_or_else(|| "-".into()),
                s.reads.to_string(),
                s.writes.to_string(),
                s.read_errors.to_string(),
                s.write_errors.to_string(),
                s.checksum_errors.to_string(),
                s.repaired_blocks.to_string(),
                s.replacement.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Counters right-aligned so digits line up; text left-aligned.
    let numeric = [true, false, false, true, true, true, true, true, true, false];
    let mut table_line = |cells: &[String]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            if numeric[i] {
                let _ = write!(line, "{cell:>w$}", w = widths[i]);
            } else {
                let _ = write!(line, "{cell:<w$}", w = widths[i]);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    };
    table_line(&header.map(String::from));
    for row in &rows {
        table_line(row);
    }

    if st.spares.is_empty() {
        let _ = writeln!(out, "spares: none");
    } else {
        let _ = writeln!(out, "spares: {}", st.spares.join(", "));
    }
    if st.rebuilds.is_empty() {
        let _ = writeln!(out, "rebuilds: none");
    } else {
        let _ = writeln!(out, "rebuilds:");
        for r in &st.rebuilds {
            let _ = writeln!(out, "  {}", rebuild_line(r));
        }
    }
    match st.max_rebuild_rate {
        Some(rate) if rate > 0 => {
            let _ = writeln!(out, "rebuild throttle: {}/s", format_size(rate));
        }
        _ => {
            let _ = writeln!(out, "rebuild throttle: unlimited");
        }
    }
    let i = &st.intent;
    let _ = writeln!(
        out,
        "write-intent bitmap: {} of {} regions dirty ({} per member each); resync at start: {} regions, {} stripes repaired, {} skipped",
        i.dirty_regions,
        i.regions,
        format_size(i.region_bytes),
        i.resync_regions,
        i.resync_repaired,
        i.resync_skipped
    );
    if i.resync_adopted > 0 {
        let _ = writeln!(out, "  {} block(s) written just before the unclean stop were taken as found (their checksum pages were deferred)", i.resync_adopted);
    }
    if i.resync_vouched > 0 {
        let _ = writeln!(out, "  {} block(s) written just before the unclean stop matched the checksums in their write-hole records", i.resync_vouched);
    }
    if st.checksums {
        let pages = if st.deferred_checksum_pages { "on, pages written at flushes" } else { "on" };
        let _ =
            writeln!(out, "block checksums: {pages}; {} block(s) failed their checksum, {} rewritten from redundancy", st.checksum_errors, st.repaired_blocks);
    } else {
        let _ = writeln!(out, "block checksums: off");
    }
    if let Some(c) = &st.stripe_cache {
        let _ = writeln!(
            out,
            "stripe cache: {} of {} stripes held; {} small write(s) took parity from it, {} stripe(s) read whole for streams",
            c.stripes, c.capacity, c.hits, c.loads
        );
    }
    if let Some(scrub) = &st.scrub {
        let _ = writeln!(out, "{}", format_scrub(scrub));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tests::sample_status;

    #[test]
    fn admin_parse_rate() {
        assert_eq!(parse_rate("200MiB/s"), Ok(Some(200 << 20)));
        assert_eq!(parse_rate("50MiB"), Ok(Some(50 << 20)));
        assert_eq!(parse_rate("1048576"), Ok(Some(1 << 20)));
        assert_eq!(parse_rate("100MB/s"), Ok(Some(100_000_000)));
        assert_eq!(parse_rate(" 1GiB/s "), Ok(Some(1 << 30)));
        for unlimited in ["0", "0/s", "0MiB/s", "unlimited", "Unlimited", "none"] {
            assert_eq!(parse_rate(unlimited), Ok(None), "{unlimited}");
        }
        for bad in ["", "/s", "fast", "-5MiB/s", "1.5MiB/s", "10MiB/h", "10MiB//s", "99999999999999999999/s"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn admin_format_status() {
        let text = format_status(&sample_status());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "volume vol0 (0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0): raid5 3+1, chunk 64 KiB, size 3 GiB, 4 members: rebuilding");
        let expected_table = [
            "SLOT  STATE       PATH   READS  WRITES  READ-ERR  WRITE-ERR  CSUM-ERR  HEALED  REPLACEMENT",
            "   0  active      /d/m0   1200     800         0          0         0       0  -",
            "   1  replacing   /d/m1   1100     790         0          0         0       0  /d/new1",
            "   2  rebuilding  /d/m4      0    5000         0          0         0       0  -",
            "   3  missing     -          7       3         2          1         3       3  -",
        ];
        assert_eq!(&lines[1..6], &expected_table[..], "\n{text}");
        assert_eq!(lines[6], "spares: /d/spare0");
        assert_eq!(lines[7], "rebuilds:");
        assert_eq!(lines[8], "  rebuild slot 2 -> /d/m4: 25.0% (256 MiB / 1 GiB), 100.0 MiB/s, ETA 8s");
        assert_eq!(lines[9], "rebuild throttle: 200 MiB/s");
        assert_eq!(lines[10], "write-intent bitmap: 0 of 0 regions dirty (0 B per member each); resync at start: 0 regions, 0 stripes repaired, 0 skipped");
        assert_eq!(lines[11], "block checksums: on; 3 block(s) failed their checksum, 3 rewritten from redundancy");
        assert_eq!(lines[12], "stripe cache: 2 of 42 stripes held; 1530 small write(s) took parity from it, 35 stripe(s) read whole for streams");
        assert_eq!(lines.len(), 13);
    }

    #[test]
    fn admin_format_status_quiet_volume() {
        let mut st = sample_status();
        st.state = VolumeState::Optimal;
        st.spares.clear();
        st.rebuilds.clear();
        st.max_rebuild_rate = None;
        // As raid0 and raid1 report it: no stripe cache, no line for it.
        st.stripe_cache = None;
        let text = format_status(&st);
        assert!(text.contains("4 members: optimal\n"), "{text}");
        assert!(text.contains("\nspares: none\n"), "{text}");
        assert!(text.contains("\nrebuilds: none\n"), "{text}");
        assert!(text.contains("\nrebuild throttle: unlimited\n"), "{text}");
        assert!(text.contains("0 stripes repaired, 0 skipped\n"), "{text}");
        assert!(text.ends_with("rewritten from redundancy\n"), "{text}");
    }

    #[test]
    fn admin_format_survives_hostile_numbers() {
        let mut st = sample_status();
        st.rebuilds[0].rate = f64::NAN;
        st.rebuilds[0].eta_seconds = Some(f64::INFINITY);
        st.rebuilds[0].done_bytes = u64::MAX;
        st.rebuilds[0].total_bytes = 0;
        st.slots.clear();
        let text = format_status(&st);
        assert!(text.contains("100.0%") && text.contains("0.0 MiB/s") && text.contains("ETA unknown"), "{text}");
        assert_eq!(format_eta(Some(1e300)), format!("{}h{:02}m", u64::MAX / 3600, u64::MAX / 60 % 60));
        assert_eq!(format_eta(Some(-1.0)), "unknown");
        assert_eq!(format_eta(Some(3725.0)), "1h02m");
        assert_eq!(format_eta(Some(185.0)), "3m05s");
    }

    #[test]
    fn admin_status_json_round_trips() {
        let st = sample_status();
        let json = serde_json::to_string_pretty(&st).unwrap();
        assert_eq!(serde_json::from_str::<VolumeStatus>(&json).unwrap(), st);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["state"], "rebuilding");
        assert_eq!(v["rebuilds"][0]["done_bytes"], 256u64 << 20);
    }

    #[test]
    fn admin_absolute_paths() {
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(absolute(Path::new("m0")).unwrap(), cwd.join("m0"));
        assert_eq!(absolute(Path::new("./m0")).unwrap(), cwd.join("m0"));
        assert_eq!(absolute(Path::new("/dev/null")).unwrap(), PathBuf::from("/dev/null"));
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let sub = real.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(absolute(&sub.join("..").join("new")).unwrap(), real.join("new"));
        assert!(absolute(Path::new("/")).is_err());
        assert!(absolute(Path::new("/no/such/dir/m0")).is_err());
    }

    #[test]
    fn admin_cli_parses() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Top {
            #[command(subcommand)]
            cmd: AdminCommand,
        }
        let parse = |args: &[&str]| Top::try_parse_from(std::iter::once("nbraid").chain(args.iter().copied())).map(|t| t.cmd);
        assert!(matches!(parse(&["status", "--control", "/c", "--json"]), Ok(AdminCommand::Status(StatusArgs { json: true, .. }))));
        assert!(parse(&["status"]).is_err(), "--control is required");
        match parse(&["rebuild", "--control", "/c", "--max-rate", "200MiB/s", "--wait"]) {
            Ok(AdminCommand::Rebuild(a)) => {
                assert_eq!(a.max_rate, Some(Rate(Some(200 << 20))));
                assert!(a.wait.wait);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["rebuild", "--control", "/c", "--max-rate", "fast"]).is_err());
        match parse(&["fault", "--control", "/c", "2", "--read-errors", "--after", "10", "--delay-ms", "5"]) {
            Ok(AdminCommand::Fault(a)) => assert!(a.read_errors && !a.write_errors && a.after == 10 && a.delay_ms == 5 && a.member == "2"),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["fault", "--control", "/c", "2", "--clear", "--read-errors"]).is_err());
        match parse(&["replace", "--control", "/c", "1", "new1", "--wait"]) {
            Ok(AdminCommand::Replace(a)) => assert!(a.old == "1" && a.new == Path::new("new1") && a.wait.wait),
            other => panic!("{other:?}"),
        }
    }

    /// A daemon that plays back a script of statuses (the last one repeats) and records requests.
    struct Scripted {
        statuses: std::sync::Mutex<std::collections::VecDeque<VolumeStatus>>,
        log: std::sync::Mutex<Vec<Request>>,
    }

    impl crate::control::api::Admin for Scripted {
        async fn handle(&self, request: Request) -> Response {
            self.log.lock().unwrap().push(request.clone());
            match request {
                Request::Status => {
                    let mut statuses = self.statuses.lock().unwrap();
                    let status = if statuses.len() > 1 { statuses.pop_front() } else { statuses.front().cloned() };
                    Response { ok: true, message: String::new(), status }
                }
                Request::Fail { member } => Response::refused(format!("no member {member}")),
                _ => Response::ok("accepted"),
            }
        }
    }

    fn parse(args: &[&str]) -> AdminCommand {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Top {
            #[command(subcommand)]
            cmd: AdminCommand,
        }
        Top::try_parse_from(std::iter::once("nbraid").chain(args.iter().copied())).unwrap().cmd
    }

    /// Runs `args` (with `--control` added) against a daemon playing `script`.
    async fn against(script: Vec<VolumeStatus>, args: &[&str]) -> (Result<i32, String>, Vec<Request>) {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("ctl");
        let server = crate::control::ControlServer::bind(&ctl).await.unwrap();
        let admin = std::sync::Arc::new(Scripted { statuses: std::sync::Mutex::new(script.into()), log: Default::default() });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(admin.clone(), async move {
            let _ = rx.await;
        }));
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--control", ctl.to_str().unwrap()]);
        let result = tokio::time::timeout(Duration::from_secs(20), run(parse(&full))).await.expect("command finishes");
        let _ = tx.send(());
        task.await.unwrap().unwrap();
        let log = admin.log.lock().unwrap().clone();
        (result, log)
    }

    /// The sample volume rebuilding slot 2 at `done` of 1 GiB, or finished in `end` state.
    fn rebuilding(done: u64) -> VolumeStatus {
        let mut st = sample_status();
        st.rebuilds[0].done_bytes = done;
        st
    }

    fn finished(state: VolumeState) -> VolumeStatus {
        let mut st = sample_status();
        st.rebuilds.clear();
        st.state = state;
        st
    }

    #[tokio::test]
    async fn admin_wait_until_optimal() {
        let script = vec![rebuilding(0), rebuilding(512 << 20), rebuilding(1 << 30), finished(VolumeState::Optimal)];
        let (result, log) = against(script, &["rebuild", "--max-rate", "100MiB/s", "--wait"]).await;
        assert_eq!(result, Ok(0));
        assert_eq!(log[0], Request::Rebuild { max_rate: Some(100 << 20) });
        assert!(log[1..].iter().all(|r| *r == Request::Status) && log.len() >= 5, "{log:?}");
    }

    #[tokio::test]
    async fn admin_wait_ending_degraded_fails() {
        let (result, _) = against(vec![rebuilding(0), finished(VolumeState::Degraded)], &["replace", "1", "new1", "--wait"]).await;
        let err = result.expect_err("degraded is not success");
        assert!(err.contains("degraded") && err.contains("slot 3 missing"), "{err}");
    }

    #[tokio::test]
    async fn admin_bare_rebuild_wait_only_watches() {
        let (result, log) = against(vec![finished(VolumeState::Optimal)], &["rebuild", "--wait"]).await;
        assert_eq!(result, Ok(0));
        assert!(log.iter().all(|r| *r == Request::Status), "{log:?}");
        let (result, log) = against(vec![finished(VolumeState::Optimal)], &["rebuild"]).await;
        assert!(result.is_err() && log.is_empty());
    }

    #[tokio::test]
    async fn admin_refusal_is_an_error() {
        let (result, _) = against(vec![sample_status()], &["fail", "7"]).await;
        assert_eq!(result, Err("no member 7".into()));
    }

    #[tokio::test]
    async fn admin_add_sends_an_absolute_path() {
        let (result, log) = against(vec![finished(VolumeState::Optimal)], &["add", "spare9"]).await;
        assert_eq!(result, Ok(0));
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(log, vec![Request::Add { path: cwd.join("spare9") }]);
    }

    #[tokio::test]
    async fn admin_fault_flags() {
        let (_, log) = against(vec![sample_status()], &["fault", "2", "--write-errors", "--after", "3"]).await;
        assert_eq!(log, vec![Request::Fault { member: "2".into(), fault: FaultSpec { write_errors: true, after_ops: 3, ..FaultSpec::default() } }]);
        let (_, log) = against(vec![sample_status()], &["fault", "2", "--clear"]).await;
        assert_eq!(log, vec![Request::Fault { member: "2".into(), fault: FaultSpec::default() }]);
        let (result, log) = against(vec![sample_status()], &["fault", "2"]).await;
        assert!(result.is_err() && log.is_empty());
    }
}
