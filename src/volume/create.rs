//! Creating a volume: preparing member files or devices and writing their superblocks.

use crate::buf::AlignedBuf;
use crate::layout::{Geometry, LayoutError, Level};
use crate::member::{Access, Member, MemberError};
use crate::meta::superblock::{member_id, random_uuid, uuid_string, SlotState, Superblock, SuperblockError, MAX_NAME_LEN, METADATA_RESERVED};
use crate::meta::{bitmap, checksums, ppl};
use crate::uring::BufRange;
use crate::uring::Engine;
use futures::future::join_all;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub level: Level,
    /// (data, parity) for [`Level::Ec`].
    pub ec: Option<(u32, u32)>,
    pub chunk: u64,
    /// Size of each member; files are created or grown (sparse) to it.
    pub member_size: Option<u64>,
    pub name: String,
    pub members: Vec<PathBuf>,
    /// Overwrite members that belong to a volume or hold data.
    pub force: bool,
    /// Keep a crc32c per 4096-byte block on every member (see `meta::checksums`).
    pub checksums: bool,
    /// With checksums: write the table pages that client writes change at the next flush, not
    /// before each data write (see `member::checksums`).
    pub deferred_checksum_pages: bool,
    /// Parity levels: keep the partial-parity log that closes the write hole (see `meta::ppl`).
    pub write_hole_log: bool,
}

#[derive(Debug, Error)]
pub enum CreateError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error("volume name must be 1 to {MAX_NAME_LEN} bytes, got {0:?}")]
    BadName(String),
    #[error("{0} is given twice")]
    Duplicate(PathBuf),
    #[error("{0}: does not exist; give --size to create it")]
    NoSize(PathBuf),
    #[error("{path}: {action} failed: {source}")]
    Prepare { path: PathBuf, action: &'static str, source: io::Error },
    #[error("{path}: already a member of volume {name:?} ({uuid}); use --force to overwrite it")]
    InVolume { path: PathBuf, name: String, uuid: String },
    #[error("{path}: has a damaged nbraid superblock ({source}); use --force to overwrite it")]
    DamagedSuperblock { path: PathBuf, source: SuperblockError },
    #[error("{0}: holds data that is not an nbraid member; use --force to overwrite it")]
    HoldsData(PathBuf),
    #[error("{path}: too small: {size} bytes, a member needs at least {need} ({METADATA_RESERVED} of metadata plus one chunk)")]
    TooSmall { path: PathBuf, size: u64, need: u64 },
}

/// What `create` made, for the summary it prints.
#[derive(Debug)]
pub struct Created {
    pub superblock: Superblock,
    pub geometry: Geometry,
}

pub async fn create(spec: &CreateSpec, engine: &Arc<Engine>) -> Result<Created, CreateError> {
    if spec.name.is_empty() || spec.name.len() > MAX_NAME_LEN {
        return Err(CreateError::BadName(spec.name.clone()));
    }
    let n = spec.members.len() as u32;
    // Validate level and shard counts before touching any member.
    Geometry::new(spec.level, n, spec.ec, spec.chunk, spec.chunk)?;
    for (i, p) in spec.members.iter().enumerate() {
        if spec.members[..i].contains(p) {
            return Err(CreateError::Duplicate(p.clone()));
        }
    }

    let mut fresh = Vec::new();
    for p in &spec.members {
        fresh.push(prepare_file(p, spec.member_size)?);
    }
    let opened: Vec<Member> =
        join_all(spec.members.iter().map(|p| Member::open(p, engine.clone(), Access::Exclusive))).await.into_iter().collect::<Result<_, _>>()?;

    let need = METADATA_RESERVED + spec.chunk;
    for m in &opened {
        let usable = spec.member_size.map_or(m.size(), |s| s.min(m.size()));
        if usable < need {
            return Err(CreateError::TooSmall { path: m.path().to_path_buf(), size: usable, need });
        }
    }
    for (m, &is_fresh) in opened.iter().zip(&fresh) {
        if !is_fresh && !spec.force {
            refuse_if_in_use(m).await?;
        }
    }
    let usable = opened.iter().map(|m| spec.member_size.map_or(m.size(), |s| s.min(m.size()))).min().unwrap_or(0);
    let Areas { geometry, checksum_offset, ppl_offset, ppl_slots, data_offset } = data_area(spec, usable)?;

    // Parity must match the data from the first read on: start from all zeros, whose parity
    // (XOR and Reed-Solomon alike) is zeros. Fresh sparse files already are.
    for (m, &is_fresh) in opened.iter().zip(&fresh) {
        if !is_fresh {
            zero_member(m.path(), data_offset + geometry.stripes * geometry.chunk)?;
        }
    }

    let volume_uuid = random_uuid().map_err(|source| CreateError::Prepare { path: spec.members[0].clone(), action: "random UUID", source })?;
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut template = Superblock {
        volume_uuid,
        member_uuid: [0; 16],
        created,
        event: 1,
        level_code: spec.level.code(),
        members: n,
        data_shards: geometry.data_shards,
        parity_shards: geometry.parity_shards,
        chunk: geometry.chunk,
        data_offset,
        member_data_bytes: geometry.stripes * geometry.chunk,
        volume_size: geometry.volume_size(),
        member_index: 0,
        name: spec.name.clone(),
        slots: vec![SlotState::Active; n as usize],
        checkpoints: vec![0; n as usize],
        slot_ids: vec![0; n as usize],
        replacement_ids: vec![0; n as usize],
        spare: false,
        replacement: false,
        checksum_offset,
        deferred_checksum_pages: spec.checksums && spec.deferred_checksum_pages,
        ppl_offset,
        ppl_slots,
    };
    // A clean write-intent bitmap on every member, so the first start resyncs nothing.
    let (region_stripes, regions) = super::intent::intent_geometry(geometry.stripes, geometry.chunk);
    let mut area = AlignedBuf::zeroed(bitmap::bitmap_len(regions));
    bitmap::seal(&mut area, &volume_uuid, region_stripes, regions);
    let area = Arc::new(area);
    for m in &opened {
        m.write_at(bitmap::BITMAP_OFFSET, BufRange::whole(area.clone())).await?;
    }
    if checksum_offset != 0 {
        for m in &opened {
            write_zero_checksums(m, &volume_uuid, checksum_offset, geometry.stripes * geometry.chunk).await?;
        }
    }
    let mut uuids = Vec::with_capacity(opened.len());
    for m in &opened {
        uuids.push(random_uuid().map_err(|source| CreateError::Prepare { path: m.path().to_path_buf(), action: "random UUID", source })?);
    }
    template.slot_ids = uuids.iter().map(member_id).collect();
    for (i, (m, uuid)) in opened.iter().zip(&uuids).enumerate() {
        let mut sb = template.clone();
        sb.member_index = i as u32;
        sb.member_uuid = *uuid;
        m.write_superblock_both(&sb).await?;
    }
    template.member_index = 0;
    tracing::debug!("created volume {} ({})", spec.name, uuid_string(&volume_uuid));
    Ok(Created { superblock: template, geometry })
}

/// Where a new volume's areas go on every member.
struct Areas {
    geometry: Geometry,
    /// 0: no checksums / no partial-parity log.
    checksum_offset: u64,
    ppl_offset: u64,
    ppl_slots: u32,
    data_offset: u64,
}

/// Lays out the metadata after the reserved first MiB: the checksum table, then (parity levels)
/// the partial-parity log ring, then the data area on a 1 MiB boundary.
fn data_area(spec: &CreateSpec, usable: u64) -> Result<Areas, CreateError> {
    let n = spec.members.len() as u32;
    let mut geometry = Geometry::new(spec.level, n, spec.ec, spec.chunk, usable - METADATA_RESERVED)?;
    let logged = spec.write_hole_log && matches!(spec.level, Level::Raid5 | Level::Ec);
    let ppl_slots = if logged { ppl::slots_for(spec.chunk) } else { 0 };
    let ring = if logged { ppl::ring_bytes(spec.chunk, ppl_slots) } else { 0 };
    // The table shrinks the data area, which shrinks the table: settle in a few rounds.
    let mut areas = Areas { geometry, checksum_offset: 0, ppl_offset: 0, ppl_slots, data_offset: METADATA_RESERVED };
    for _ in 0..4 {
        let table = if spec.checksums { checksums::table_bytes(geometry.stripes * geometry.chunk) } else { 0 };
        let data_offset = METADATA_RESERVED + (table + ring).div_ceil(1 << 20) * (1 << 20);
        if usable < data_offset + spec.chunk {
            return Err(CreateError::TooSmall { path: spec.members[0].clone(), size: usable, need: data_offset + spec.chunk });
        }
        geometry = Geometry::new(spec.level, n, spec.ec, spec.chunk, usable - data_offset)?;
        areas = Areas {
            geometry,
            checksum_offset: if spec.checksums { METADATA_RESERVED } else { 0 },
            ppl_offset: if logged { METADATA_RESERVED + table } else { 0 },
            ppl_slots,
            data_offset,
        };
    }
    Ok(areas)
}

/// Writes every page of a fresh table, copy 0, saying every block holds zeros (which `create`
/// made true).
async fn write_zero_checksums(m: &Member, uuid: &[u8; 16], table_offset: u64, data_bytes: u64) -> Result<(), CreateError> {
    const PAGES_PER_WRITE: u64 = 1024;
    let pages = checksums::pages_for(data_bytes);
    let entries = vec![checksums::zero_entry(); checksums::ENTRIES_PER_PAGE as usize];
    let mut page = 0;
    while page < pages {
        let count = PAGES_PER_WRITE.min(pages - page);
        let mut buf = AlignedBuf::zeroed(count as usize * 2 * checksums::PAGE);
        for (i, pair) in buf.chunks_mut(2 * checksums::PAGE).enumerate() {
            checksums::encode_page(&mut pair[..checksums::PAGE], uuid, page + i as u64, 0, &entries);
        }
        m.write_at(table_offset + checksums::page_offset(page, 0), BufRange::whole(Arc::new(buf))).await?;
        page += count;
    }
    m.sync().await?;
    Ok(())
}

/// Creates a missing file or grows a short one to `size`. Returns true if the member is known
/// to be blank (newly created), so it needs neither the in-use check nor zeroing.
fn prepare_file(path: &Path, size: Option<u64>) -> Result<bool, CreateError> {
    let err = |action, source| CreateError::Prepare { path: path.to_path_buf(), action, source };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let size = size.ok_or_else(|| CreateError::NoSize(path.to_path_buf()))?;
            let f = OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| err("create", e))?;
            f.set_len(size).map_err(|e| err("set size", e))?;
            Ok(true)
        }
        Err(e) => Err(err("stat", e)),
        Ok(meta) if meta.file_type().is_block_device() => Ok(false),
        Ok(meta) if meta.is_file() => {
            if let Some(size) = size {
                if meta.len() < size {
                    let f = OpenOptions::new().write(true).open(path).map_err(|e| err("open", e))?;
                    f.set_len(size).map_err(|e| err("grow", e))?;
                }
            }
            Ok(false)
        }
        Ok(_) => Err(CreateError::Member(MemberError::NotStorage { path: path.to_path_buf() })),
    }
}

/// Refuses a member that belongs to a volume, or a file that holds any data.
async fn refuse_if_in_use(m: &Member) -> Result<(), CreateError> {
    match m.read_superblock().await {
        Ok(sb) => Err(CreateError::InVolume { path: m.path().to_path_buf(), name: sb.name, uuid: uuid_string(&sb.volume_uuid) }),
        Err(MemberError::Superblock { source: SuperblockError::NoMagic, .. }) => {
            if has_data(m.path()).map_err(|source| CreateError::Prepare { path: m.path().to_path_buf(), action: "look for data", source })? {
                Err(CreateError::HoldsData(m.path().to_path_buf()))
            } else {
                Ok(())
            }
        }
        Err(MemberError::Superblock { source, .. }) => Err(CreateError::DamagedSuperblock { path: m.path().to_path_buf(), source }),
        Err(e) => Err(e.into()),
    }
}

/// Allocated bytes `has_data` reads to see whether they are all zero before calling a file
/// non-blank; beyond this it assumes data (and `--force` is needed).
const ZERO_SCAN_LIMIT: u64 = 256 << 20;

/// True if a regular file holds a non-zero byte. Holes are skipped (SEEK_DATA); allocated
/// ranges are read, up to [`ZERO_SCAN_LIMIT`], since a preallocated or FUSE-backed blank file
/// reports its zeros as data. Block devices: assumed blank.
pub(super) fn has_data(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(false);
    }
    let f = std::fs::File::open(path)?;
    let seek = |from: u64, whence| -> io::Result<Option<u64>> {
        // SAFETY: plain syscall on a descriptor we own.
        let pos = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
        if pos >= 0 {
            return Ok(Some(pos as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None), // no more data past `from`
            _ => Err(e),
        }
    };
    let mut scanned = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while let Some(start) = seek(pos, libc::SEEK_DATA)? {
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(meta.len());
        let mut at = start;
        while at < end {
            if scanned >= ZERO_SCAN_LIMIT {
                return Ok(true);
            }
            let n = ((end - at) as usize).min(buf.len());
            let got = f.read_at(&mut buf[..n], at)?;
            if got == 0 {
                break;
            }
            if buf[..got].iter().any(|&b| b != 0) {
                return Ok(true);
            }
            at += got as u64;
            scanned += got as u64;
        }
        pos = end;
        if pos >= meta.len() {
            break;
        }
    }
    Ok(false)
}

/// Makes [0, len) of a member read as zeros: punches a hole in a file, BLKZEROOUT on a device.
fn zero_member(path: &Path, len: u64) -> Result<(), CreateError> {
    let err = |source| CreateError::Prepare { path: path.to_path_buf(), action: "zero", source };
    let f = OpenOptions::new().write(true).open(path).map_err(err)?;
    let meta = f.metadata().map_err(err)?;
    let rc = if meta.file_type().is_block_device() {
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range: [u64; 2] = [0, len];
        unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT, range.as_ptr()) }
    } else {
        unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, len.min(meta.len()) as libc::off_t) }
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    f.sync_all().map_err(err)
}
