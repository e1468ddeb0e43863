//! The write-intent bitmap's on-disk format. One bit per region of stripes: set (and durable)
//! before any write to the region is issued, cleared once the region's writes are durable. After
//! a crash only regions whose bit is set can hold a stripe whose parity disagrees with its data.
//!
//! Format (version 1), on every member at [`BITMAP_OFFSET`]:
//! - a 4096-byte header: magic `NBRAIDBM` (8), version u32, region stripes u64 (at 16), regions
//!   u64 (at 24), volume UUID (at 32, 16 bytes), then from offset 64 one crc32c per bits page,
//!   and at 4092 the crc32c of bytes 0..4092;
//! - then the bits, little-endian within bytes, in 4096-byte pages; each page's crc32c is in the
//!   header, so a torn page is detected (and read as all dirty, the safe answer).

use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"NBRAIDBM";
pub const VERSION: u32 = 1;
/// Where the bitmap starts on every member (inside the reserved metadata area).
pub const BITMAP_OFFSET: u64 = 64 << 10;
pub const PAGE: usize = 4096;
const PAGE_CRCS_AT: usize = 64;
const CRC_AT: usize = PAGE - 4;
/// Bits pages at most: what fits in the metadata area after the bitmap offset (and well within
/// the header's room for page checksums).
pub const MAX_PAGES: usize = 224;
/// Regions at most: enough that regions stay small on any member size we support.
pub const MAX_REGIONS: u64 = (MAX_PAGES * PAGE * 8) as u64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BitmapError {
    #[error("no write-intent bitmap")]
    NoMagic,
    #[error("write-intent bitmap header checksum mismatch")]
    BadChecksum,
    #[error("write-intent bitmap version {0} is not supported")]
    UnsupportedVersion(u32),
    #[error("write-intent bitmap is for another volume or geometry")]
    Mismatch,
}

/// Bytes the bitmap occupies on a member for `regions` regions (header included).
pub fn bitmap_len(regions: u64) -> usize {
    PAGE + pages(regions) * PAGE
}

pub fn pages(regions: u64) -> usize {
    (regions as usize).div_ceil(PAGE * 8)
}

/// Regions of `region_stripes` stripes each, covering `stripes` stripes.
pub fn regions_for(stripes: u64, region_stripes: u64) -> u64 {
    stripes.div_ceil(region_stripes)
}

/// Writes a fresh header for the bits that follow it in `area` (header page + bits pages).
pub fn seal(area: &mut [u8], volume_uuid: &[u8; 16], region_stripes: u64, regions: u64) {
    let (header, bits) = area.split_at_mut(PAGE);
    header.fill(0);
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&region_stripes.to_le_bytes());
    header[24..32].copy_from_slice(&regions.to_le_bytes());
    header[32..48].copy_from_slice(volume_uuid);
    for (i, page) in bits.chunks(PAGE).take(pages(regions)).enumerate() {
        reseal_page_crc(header, i, page);
    }
    reseal_header(header);
}

/// Records the checksum of bits page `i` in the header (then call [`reseal_header`]).
pub fn reseal_page_crc(header: &mut [u8], i: usize, page: &[u8]) {
    let at = PAGE_CRCS_AT + 4 * i;
    header[at..at + 4].copy_from_slice(&crate::codec::crc32c(page).to_le_bytes());
}

pub fn reseal_header(header: &mut [u8]) {
    let crc = crate::codec::crc32c(&header[..CRC_AT]);
    header[CRC_AT..PAGE].copy_from_slice(&crc.to_le_bytes());
}

/// Reads the dirty regions out of a member's bitmap area. A bits page whose checksum fails
/// counts as all dirty.
pub fn dirty_regions(area: &[u8], volume_uuid: &[u8; 16], region_stripes: u64, regions: u64) -> Result<Vec<u64>, BitmapError> {
    if area.len() < bitmap_len(regions) {
        return Err(BitmapError::Mismatch);
    }
    let (header, bits) = area.split_at(PAGE);
    if &header[0..8] != MAGIC {
        return Err(BitmapError::NoMagic);
    }
    let stored = u32::from_le_bytes(header[CRC_AT..PAGE].try_into().expect("4 bytes"));
    if crate::codec::crc32c(&header[..CRC_AT]) != stored {
        return Err(BitmapError::BadChecksum);
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(BitmapError::UnsupportedVersion(version));
    }
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if u64_at(16) != region_stripes || u64_at(24) != regions || &header[32..48] != volume_uuid {
        return Err(BitmapError::Mismatch);
    }
    let mut dirty = Vec::new();
    for (i, page) in bits.chunks(PAGE).take(pages(regions)).enumerate() {
        let at = PAGE_CRCS_AT + 4 * i;
        let want = u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let first = (i * PAGE * 8) as u64;
        let torn = crate::codec::crc32c(page) != want;
        for bit in 0..(PAGE * 8) as u64 {
            let r = first + bit;
            if r >= regions {
                break;
            }
            if torn || page[(bit / 8) as usize] & (1 << (bit % 8)) != 0 {
                dirty.push(r);
            }
        }
    }
    Ok(dirty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_torn_page() {
        let regions = 40_000; // two bits pages
        let uuid = [7u8; 16];
        let mut area = vec![0u8; bitmap_len(regions)];
        area[PAGE] |= 1 << 3; // region 3
        area[PAGE + PAGE + 1] |= 1; // region 32768 + 8
        seal(&mut area, &uuid, 16, regions);
        assert_eq!(dirty_regions(&area, &uuid, 16, regions).unwrap(), vec![3, 32768 + 8]);
        assert_eq!(dirty_regions(&area, &[0; 16], 16, regions), Err(BitmapError::Mismatch));
        assert_eq!(dirty_regions(&area, &uuid, 8, regions), Err(BitmapError::Mismatch));
        // A bit set after sealing without resealing looks like a torn page: all of it dirty.
        area[PAGE + 100] |= 1;
        let d = dirty_regions(&area, &uuid, 16, regions).unwrap();
        assert_eq!(d.len(), 32768 + 1);
        let mut bad = area.clone();
        bad[20] ^= 1;
        assert_eq!(dirty_regions(&bad, &uuid, 16, regions), Err(BitmapError::BadChecksum));
        assert_eq!(dirty_regions(&vec![0u8; bitmap_len(regions)], &uuid, 16, regions), Err(BitmapError::NoMagic));
    }

    #[test]
    fn sizes() {
        const { assert!(PAGE_CRCS_AT + 4 * MAX_PAGES <= CRC_AT) };
        assert_eq!(bitmap_len(1), 2 * PAGE);
        assert_eq!(regions_for(100, 16), 7);
        assert!(BITMAP_OFFSET as usize + bitmap_len(MAX_REGIONS) <= super::super::superblock::METADATA_RESERVED as usize);
    }
}
