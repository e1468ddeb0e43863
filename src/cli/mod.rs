//! The command line: `create`, `serve`, `check`.

mod admin;
mod serve;
pub mod size;

use crate::layout::Level;
use crate::member::Access;
use crate::meta::superblock::uuid_string;
use crate::uring::Engine;
use crate::volume::{self, CreateSpec};
use clap::{Parser, Subcommand, ValueEnum};
use size::{format_size, parse_size};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "nbraid", version, about = "RAID and erasure-coded block volumes, exported over NBD")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a volume on member files or block devices.
    Create(CreateArgs),
    /// Assemble a volume from its members and serve it over NBD (no arguments: a demo volume).
    Serve(serve::ServeArgs),
    /// Offline check that parity and mirrors agree with the data, stripe by stripe.
    Check(CheckArgs),
    #[command(flatten)]
    Admin(admin::AdminCommand),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LevelArg {
    Raid0,
    Raid1,
    Raid5,
    /// Reed-Solomon with two parity shards (ec with --parity 2).
    Raid6,
    /// Reed-Solomon erasure coding with --data K --parity M.
    Ec,
}

#[derive(clap::Args, Debug)]
struct CreateArgs {
    #[arg(long, value_enum)]
    level: LevelArg,
    /// Data shards per stripe (ec).
    #[arg(long)]
    data: Option<u32>,
    /// Parity shards per stripe (ec).
    #[arg(long)]
    parity: Option<u32>,
    /// Bytes per member per stripe, a multiple of 4 KiB.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    chunk: u64,
    /// Size of each member; files are created or grown (sparse) to it. Default: the members' current size.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Volume name, also the NBD export name.
    #[arg(long, default_value = "nbraid")]
    name: String,
    /// Overwrite members that already belong to a volume or hold data.
    #[arg(long)]
    force: bool,
    /// Keep a crc32c of every 4 KiB block on its member, verified on every read (`off` gives up
    /// silent-corruption detection to save a 4 KiB checksum-page write before each data write).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    checksums: OnOff,
    /// When the checksum pages that client writes change reach the disk: `ordered` writes
    /// them durably before each data write, so even a write torn by a power cut is caught;
    /// `deferred` writes them at the next flush (and every few seconds), saving that disk
    /// write and cache flush, and after a crash takes the blocks written since the last flush
    /// as they are (like a disk without checksums would).
    #[arg(long, value_enum, default_value_t = PageOrder::Ordered)]
    checksum_pages: PageOrder,
    /// raid5/ec: log the partial parity of every stripe write first, so a crash followed by the
    /// loss of a member cannot corrupt untouched data (the write hole). `off` saves one small
    /// write per stripe write.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    write_hole_log: OnOff,
    /// Member files or block devices, in slot order.
    #[arg(required = true)]
    members: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The volume's member files or devices, in any order.
    #[arg(required = true)]
    members: Vec<PathBuf>,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    if !matches!(cli.command, Command::Serve(_)) {
        // Commands that print behave like other Unix tools when their reader goes away
        // (`nbraid status | head`): they end quietly. The daemon keeps SIGPIPE ignored, so a
        // client hanging up is an error on that connection, not the end of the process.
        // SAFETY: restoring a default signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logging();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(args) = &cli.command {
        builder.worker_threads(args.worker_threads());
    }
    let runtime = match builder.enable_all().thread_name("nbraid").build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Create(args) => create(args).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Check(args) => check(args).await,
            Command::Admin(cmd) => admin::run(cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(msg) => fail(msg),
    }
}

fn fail(msg: String) -> i32 {
    eprintln!("nbraid: error: {msg}");
    1
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn engine() -> Result<std::sync::Arc<Engine>, String> {
    Engine::new().map_err(|e| format!("cannot set up io_uring: {e}"))
}

/// Turns the level flags into a level and, for erasure coding, its (data, parity) shape.
fn level_shape(level: LevelArg, data: Option<u32>, parity: Option<u32>, members: usize) -> Result<(Level, Option<(u32, u32)>), String> {
    let n = members as u32;
    match level {
        LevelArg::Ec => match (data, parity) {
            (Some(k), Some(m)) => Ok((Level::Ec, Some((k, m)))),
            _ => Err("--level ec needs --data K and --parity M".into()),
        },
        LevelArg::Raid6 => {
            if parity.is_some_and(|m| m != 2) {
                return Err("raid6 has exactly 2 parity shards; use --level ec for other counts".into());
            }
            let k = data.unwrap_or(n.saturating_sub(2));
            if n < 4 {
                return Err(format!("raid6 needs at least 4 members, got {n}"));
            }
            Ok((Level::Ec, Some((k, 2))))
        }
        other => {
            if data.is_some() || parity.is_some() {
                return Err("--data and --parity only apply to --level ec and raid6".into());
            }
            let level = match other {
                LevelArg::Raid0 => Level::Raid0,
                LevelArg::Raid1 => Level::Raid1,
                _ => Level::Raid5,
            };
            Ok((level, None))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PageOrder {
    Ordered,
    Deferred,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

async fn create(args: CreateArgs) -> Result<i32, String> {
    let (level, ec) = level_shape(args.level, args.data, args.parity, args.members.len())?;
    if args.checksums == OnOff::Off && args.checksum_pages == PageOrder::Deferred {
        return Err("--checksum-pages deferred needs --checksums on (there are no checksum pages to defer)".into());
    }
    let spec = CreateSpec {
        level,
        ec,
        chunk: args.chunk,
        member_size: args.size,
        name: args.name,
        members: args.members,
        force: args.force,
        checksums: args.checksums == OnOff::On,
        deferred_checksum_pages: args.checksum_pages == PageOrder::Deferred,
        write_hole_log: args.write_hole_log == OnOff::On,
    };
    let created = volume::create(&spec, &engine()?).await.map_err(|e| e.to_string())?;
    let g = created.geometry;
    println!(
        "created volume {:?} ({}): {} {}+{} on {} members, chunk {}, size {} ({} bytes)",
        created.superblock.name,
        uuid_string(&created.superblock.volume_uuid),
        g.level,
        g.data_shards,
        g.parity_shards,
        g.members,
        format_size(g.chunk),
        format_size(g.volume_size()),
        g.volume_size()
    );
    for (i, p) in spec.members.iter().enumerate() {
        println!("  slot {i}: {}", p.display());
    }
    Ok(0)
}

async fn check(args: CheckArgs) -> Result<i32, String> {
    let vol = volume::assemble(&args.members, &engine()?, Access::SharedReadOnly).await.map_err(|e| e.to_string())?;
    let g = *vol.geometry();
    println!("volume {:?}: {} {}+{}, chunk {}, {} stripes", vol.name(), g.level, g.data_shards, g.parity_shards, format_size(g.chunk), g.stripes);
    let report = volume::check(&vol).await.map_err(|e| e.to_string())?;
    if !report.redundant {
        println!("raid0 has no redundancy: {}", if report.checksums { "checking block checksums only" } else { "nothing to check against" });
    }
    if report.dirty_regions > 0 {
        println!("note: {} region(s) are marked dirty (unclean stop, not yet resynced by `nbraid serve`)", report.dirty_regions);
    }
    println!("checked stripes: {}", report.stripes - report.skipped);
    println!("inconsistent stripes: {}", report.inconsistent);
    if report.checksums {
        println!("blocks failing their checksum: {}", report.checksum_errors);
        if report.unverified > 0 {
            println!(
                "blocks in dirty regions not matching their checksum: {} (deferred checksum pages: writes cut off by the unclean stop; `nbraid serve` takes them as found)",
                report.unverified
            );
        }
        for (path, offset) in &report.first_damaged {
            println!("  damaged block: {} at offset {offset}", path.display());
        }
    } else {
        println!("block checksums: none (volume created with --checksums off)");
    }
    if report.inconsistent > 0 {
        let list: Vec<String> = report.first_inconsistent.iter().map(|s| s.to_string()).collect();
        println!("first inconsistent stripes: {}", list.join(", "));
    }
    if report.inconsistent > 0 || report.checksum_errors > 0 {
        return Ok(1);
    }
    if report.skipped > 0 {
        println!("unchecked stripes: {} (members missing: nothing left to check them against)", report.skipped);
        return Err(format!("{} of {} stripes could not be checked because members are missing", report.skipped, report.stripes));
    }
    Ok(0)
}
