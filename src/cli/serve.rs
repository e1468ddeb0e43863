//! `nbraid serve`: assemble, export over NBD, and on SIGTERM/SIGINT drain, flush and exit 0.
//! Also the built-in demo volume for `nbraid serve` with no arguments.

use super::size::format_size;
use crate::buf::AlignedBuf;
use crate::control::api::{Admin, Request, Response};
use crate::control::server::ControlServer;
use crate::layout::Level;
use crate::member::Access;
use crate::member::FaultPlan;
use crate::meta::superblock::uuid_string;
use crate::nbd::{self, BlockDevice, DeviceError, ListenAddr, ServerConfig};
use crate::uring::Engine;
use crate::volume::{self, CreateSpec, Volume, VolumeError};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the demo volume lives, relative to the working directory.
const DEMO_DIR: &str = "nbraid-data";
const DEMO_MEMBERS: usize = 4;
const DEMO_MEMBER_SIZE: u64 = 1 << 30;
const DEMO_NAME: &str = "demo";
const DEFAULT_LISTEN: &str = "tcp:127.0.0.1:10809";

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Where to accept NBD clients: unix:PATH or tcp:HOST:PORT (repeatable). Default tcp:127.0.0.1:10809.
    #[arg(long)]
    listen: Vec<ListenAddr>,
    /// Admin socket for `nbraid status`, `fail`, `add`, `replace`, `rebuild`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Threads that serve requests. Default: half the cores, at least one. On few cores the
    /// cost that dominates is handing requests between threads, not running them, and the NBD
    /// clients need the other cores.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Request data (WRITE payloads, READ results) held in memory at once across all clients;
    /// a client that would go beyond it waits (backpressure). Each connection gets at most half.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_buffer_size)]
    max_buffered: u64,
    /// Accept `nbraid fault` requests on the control socket (tests only).
    #[arg(long, hide = true)]
    allow_fault_injection: bool,
    /// The volume's member files or devices, in any order. None at all: the demo volume.
    members: Vec<PathBuf>,
}

fn parse_buffer_size(s: &str) -> Result<u64, String> {
    let n = super::size::parse_size(s)?;
    // The budget counts bytes in a u32, as NBD request lengths do (4GiB means 4GiB - 1).
    if !(1 << 20..=1 << 32).contains(&n) {
        return Err("must be between 1MiB and 4GiB".into());
    }
    Ok(n)
}

impl ServeArgs {
    pub fn worker_threads(&self) -> usize {
        match self.threads {
            Some(n) => usize::from(n),
            None => (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1),
        }
    }
}

/// The volume as the NBD server sees it.
struct VolumeDevice(Arc<Volume>);

fn device_error(e: VolumeError) -> DeviceError {
    match e {
        VolumeError::OutOfRange { .. } => DeviceError::Invalid(e.to_string()),
        other => {
            tracing::error!("{other}");
            DeviceError::Io(other.to_string())
        }
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn preferred_block_size(&self) -> u32 {
        // A whole chunk is the unit that touches one member; cap at what the protocol advises.
        (self.0.geometry().chunk.min(1 << 20) as u32).max(4096)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, DeviceError> {
        self.0.read(offset, len).await.map_err(device_error)
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), DeviceError> {
        self.0.write(offset, data, fua).await.map_err(device_error)
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush().await.map_err(device_error)
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<(), DeviceError> {
        // Trim is advisory in NBD. Discarding data chunks would leave parity stale, so the bytes
        // stay as they are; a later issue can punch holes stripe-wise where that is safe.
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.0.write_zeroes(offset, len, fua).await.map_err(device_error)
    }
}

/// The volume as the control socket sees it.
struct VolumeAdmin {
    volume: Arc<Volume>,
    allow_faults: bool,
}

fn answer(result: Result<String, volume::AdminError>) -> Response {
    match result {
        Ok(msg) => Response::ok(msg),
        Err(e) => Response::refused(e.to_string()),
    }
}

impl Admin for VolumeAdmin {
    async fn handle(&self, request: Request) -> Response {
        let v = &self.volume;
        match request {
            Request::Status => Response { ok: true, message: String::new(), status: Some(v.status()) },
            Request::Fail { member } => answer(v.fail(&member).await),
            Request::Add { path } => answer(v.add(&path).await),
            Request::Replace { old, new } => answer(v.replace(&old, &new).await),
            Request::Rebuild { max_rate } => Response::ok(v.set_max_rebuild_rate(max_rate)),
            Request::Scrub { repair, max_rate } => answer(v.start_scrub(repair, max_rate)),
            Request::Fault { member, fault } => {
                if !self.allow_faults {
                    return Response::refused("fault injection is off; start the daemon with --allow-fault-injection");
                }
                let plan = FaultPlan {
                    read_errors: fault.read_errors,
                    write_errors: fault.write_errors,
                    after_ops: fault.after_ops,
                    delay: std::time::Duration::from_millis(fault.delay_ms),
                    torn_write: fault.torn_write,
                };
                answer(v.inject_faults(&member, plan))
            }
        }
    }
}

pub async fn run(args: ServeArgs) -> Result<i32, String> {
    let engine = Engine::new().map_err(|e| format!("cannot set up io_uring: {e}"))?;
    let demo = args.members.is_empty() && args.listen.is_empty() && args.control.is_none();
    let members = if demo { demo_members(&engine).await? } else { args.members };
    if members.is_empty() {
        return Err("no members given (run `nbraid serve` with no arguments at all for the demo volume)".into());
    }
    let listen = if args.listen.is_empty() { vec![DEFAULT_LISTEN.parse().map_err(|e| format!("{e}"))?] } else { args.listen };

    let volume = Arc::new(volume::assemble(&members, &engine, Access::Exclusive).await.map_err(|e| e.to_string())?);
    let g = *volume.geometry();
    tracing::info!(
        "volume {:?} ({}): {} {}+{} on {} members, chunk {}, size {}",
        volume.name(),
        uuid_string(volume.uuid()),
        g.level,
        g.data_shards,
        g.parity_shards,
        g.members,
        format_size(g.chunk),
        format_size(volume.size())
    );
    for (slot, m) in volume.member_paths().iter().enumerate() {
        match m {
            Some((path, direct)) => tracing::info!("  slot {slot}: {} ({})", path.display(), if *direct { "O_DIRECT" } else { "buffered" }),
            None => tracing::warn!("  slot {slot}: lost (serving degraded)"),
        }
    }
    if demo {
        print_demo_help(volume.name(), &listen);
    }

    let control = match &args.control {
        Some(path) => Some(ControlServer::bind(path).await.map_err(|e| format!("control socket {}: {e}", path.display()))?),
        None => None,
    };
    let mut config = ServerConfig::new(volume.name().to_string());
    config.max_server_bytes = args.max_buffered as usize;
    config.max_in_flight_bytes = config.max_in_flight_bytes.min(config.max_server_bytes / 2).max(1 << 20);
    let device = Arc::new(VolumeDevice(volume.clone()));
    let server = nbd::Server::bind(device, config, &listen).await.map_err(|e| format!("cannot listen: {e}"))?;
    volume.start_background();

    // One signal stops both servers.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|&stop| stop).await;
        }
    };
    let control_task = control.map(|c| {
        let admin = Arc::new(VolumeAdmin { volume: volume.clone(), allow_faults: args.allow_fault_injection });
        tokio::spawn(c.run(admin, stopped()))
    });
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let served = server.run(stopped()).await;
    if let Some(task) = control_task {
        let _ = task.await;
    }
    served.map_err(|e| format!("NBD server failed: {e}"))?;
    volume.shutdown().await;
    volume.flush().await.map_err(|e| format!("final flush failed: {e}"))?;
    volume.close().await;
    tracing::info!("all members flushed; exiting");
    Ok(0)
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining and shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: draining and shutting down"),
    }
}

/// The demo volume's members, creating the volume on first use.
async fn demo_members(engine: &Arc<Engine>) -> Result<Vec<PathBuf>, String> {
    let dir = PathBuf::from(DEMO_DIR);
    let members: Vec<PathBuf> = (0..DEMO_MEMBERS).map(|i| dir.join(format!("m{i}"))).collect();
    if members.iter().all(|m| m.exists()) {
        return Ok(members);
    }
    if members.iter().any(|m| m.exists()) {
        return Err(format!("{DEMO_DIR}/ holds only some of the demo members m0..m{}; remove it to start afresh", DEMO_MEMBERS - 1));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {DEMO_DIR}/: {e}"))?;
    let spec = CreateSpec {
        level: Level::Raid5,
        ec: None,
        chunk: 64 << 10,
        member_size: Some(DEMO_MEMBER_SIZE),
        name: DEMO_NAME.into(),
        members: members.clone(),
        force: false,
        checksums: true,
        deferred_checksum_pages: false,
        write_hole_log: true,
    };
    volume::create(&spec, engine).await.map_err(|e| e.to_string())?;
    tracing::info!("created the demo volume: RAID-5 over {DEMO_MEMBERS} sparse 1 GiB files in {DEMO_DIR}/");
    Ok(members)
}

fn print_demo_help(name: &str, listen: &[ListenAddr]) {
    let uri = match listen.first() {
        Some(ListenAddr::Tcp(addr)) => format!("nbd://{addr}/{name}"),
        Some(ListenAddr::Unix(path)) => format!("nbd+unix:///{name}?socket={}", path.display()),
        None => return,
    };
    println!(
        "\nnbraid demo volume {name:?} is being served at {uri}\n\
         \n  inspect:    nbdinfo {uri}\n\
         \n  attach (kernel nbd):  nbd-client 127.0.0.1 10809 /dev/nbd0 -N {name}\n\
         \n  mount without the nbd module:\n\
         \x20   mkdir -p /tmp/nbraid-fuse /mnt/nbraid\n\
         \x20   nbdfuse /tmp/nbraid-fuse {uri} &\n\
         \x20   LOOP=$(losetup -f --show /tmp/nbraid-fuse/nbd)\n\
         \x20   mkfs.ext4 -q $LOOP && mount $LOOP /mnt/nbraid\n\
         \n  benchmark:  NBD_URI={uri} fio fio-profiles/randread-4k-qd32.fio\n\
         \n  offline check (after stopping): nbraid check {DEMO_DIR}/m*\n\
         \nStop with Ctrl-C (drains in-flight requests and flushes members).\n"
    );
}
