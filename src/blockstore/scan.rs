//! Open-time walk of the record chain. Records tile units [1, total) from
//! the start, so each valid header tells where the next one begins. A header
//! that fails verification is an "orphan": we search forward unit by unit
//! for the next valid header and report the gap, which the caller may reuse.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use super::format::{Header, HEADER_LEN, UNIT};

#[derive(Debug)]
pub(crate) enum Scanned {
    /// A verified header (block or free) at `unit`.
    Record { unit: u64, header: Header },
    /// [unit, unit+units) held no valid header at its start.
    Orphan { unit: u64, units: u64, why: String },
}

/// Units read per I/O while searching past an orphan.
const SEARCH_CHUNK_UNITS: u64 = 256;

pub(crate) fn scan(file: &File, nonce: u64, total_units: u64) -> io::Result<Vec<Scanned>> {
    let mut out = Vec::new();
    let mut unit = 1;
    while unit < total_units {
        let mut buf = [0u8; HEADER_LEN];
        file.read_exact_at(&mut buf, unit * UNIT)?;
        match Header::decode(&buf, nonce, unit, total_units) {
            Ok(header) => {
                let next = unit + header.units; // decode checked it fits
                out.push(Scanned::Record { unit, header });
                unit = next;
            }
            Err(why) => {
                let next = next_valid_header(file, nonce, unit + 1, total_units)?;
                out.push(Scanned::Orphan {
                    unit,
                    units: next - unit,
                    why,
                });
                unit = next;
            }
        }
    }
    Ok(out)
}

/// First unit >= `from` whose start holds a valid header, or `total_units`.
fn next_valid_header(file: &File, nonce: u64, from: u64, total_units: u64) -> io::Result<u64> {
    let mut unit = from;
    let mut chunk = Vec::new();
    while unit < total_units {
        // Holes of a sparse image read as zeros: skip them without reading.
        match next_data_unit(file, unit) {
            Some(u) if u >= total_units => return Ok(total_units),
            Some(u) => unit = unit.max(u),
            None => {}
        }
        let n = SEARCH_CHUNK_UNITS.min(total_units - unit);
        chunk.resize((n * UNIT) as usize, 0);
        file.read_exact_at(&mut chunk, unit * UNIT)?;
        for (i, unit_bytes) in chunk.chunks_exact(UNIT as usize).enumerate() {
            let u = unit + i as u64;
            if Header::decode(unit_bytes, nonce, u, total_units).is_ok() {
                return Ok(u);
            }
        }
        unit += n;
    }
    Ok(total_units)
}

/// Unit holding the next non-hole byte at or after `unit` (SEEK_DATA), or
/// None when the filesystem cannot tell us (then we simply read on).
fn next_data_unit(file: &File, unit: u64) -> Option<u64> {
    let off = libc::off_t::try_from(unit * UNIT).ok()?;
    // SAFETY: lseek on a valid fd owned by `file`; the image is only ever
    // accessed with positional I/O, so moving the file offset is harmless.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r >= 0 {
        return Some(r as u64 / UNIT);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => Some(u64::MAX), // only a hole remains
        _ => None,
    }
}
