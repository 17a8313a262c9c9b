//! The blockd diff stream, version 1: what `blockctl export-diff` writes and
//! `blockctl import-diff` reads. The byte layout is specified in `docs/diff-stream.md`;
//! this module is its one implementation (pure: any `Read`/`Write`).
//!
//! ```text
//! header:  magic "BLKDDIFF" | version u32 | json_len u32 | json | crc32 u32
//! record:  kind u8 ('D' data | 'Z' zeros) | offset u64 | length u64 | [data] | crc32 u32
//! end:     'E' | records u64 | data_bytes u64 | zero_bytes u64 | stream_crc32 u32
//! ```
//! Integers are little-endian; CRCs are CRC-32 (IEEE 802.3, as zlib and gzip compute
//! it). Every record carries its own CRC; the end marker carries the totals and the CRC
//! of every byte before its last field, so a dropped, duplicated, reordered or truncated
//! record is caught even when each record is intact. Records are in ascending offset
//! order and never overlap; the reader enforces it.

use std::io::{Read, Write};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"BLKDDIFF";
pub const VERSION: u32 = 1;
/// Largest header JSON a reader accepts.
pub const MAX_HEADER_JSON: u32 = 64 * 1024;
/// Largest data record a writer emits and a reader accepts.
pub const MAX_DATA_RECORD: u64 = 4 * 1024 * 1024;

const KIND_DATA: u8 = b'D';
const KIND_ZERO: u8 = b'Z';
const KIND_END: u8 = b'E';

/// Who an image is: enough for a person and for `import-diff` to match a base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub volume: String,
    pub snapshot: String,
    pub size_bytes: u64,
    pub created_unix: u64,
    /// The snapshot's epoch in its lineage on the exporting daemon.
    pub epoch: u64,
    /// The snapshot's stable id (a UUID) on the exporting daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Its volume's stable id on the exporting daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_uuid: Option<String>,
}

/// The stream header (its JSON part).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    /// The exporting pool's chunk size: the granularity of the records.
    pub chunk_size: u64,
    /// The target image's size: the importing volume is resized to it.
    pub target_size: u64,
    /// None: a full stream (every allocated extent of the target).
    pub base: Option<Identity>,
    pub target: Identity,
    pub created_unix: u64,
    pub tool: String,
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Data { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

impl Record {
    pub fn range(&self) -> (u64, u64) {
        match self {
            Record::Data { offset, data } => (*offset, data.len() as u64),
            Record::Zero { offset, len } => (*offset, *len),
        }
    }
}

/// Totals of a stream, as its end marker states them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// A `Write` that also feeds the running stream CRC.
struct Crc<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Crc<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.inner.write_all(bytes)
    }
}

pub struct Writer<W: Write> {
    out: Crc<W>,
    totals: Totals,
    next_offset: u64,
    target_size: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the header.
    pub fn new(out: W, header: &Header) -> anyhow::Result<Self> {
        let json = serde_json::to_vec(header)?;
        ensure!(
            json.len() as u32 <= MAX_HEADER_JSON,
            "diff stream header too large"
        );
        let mut head = Vec::with_capacity(16 + json.len() + 4);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(json.len() as u32).to_le_bytes());
        head.extend_from_slice(&json);
        let crc = crc32fast::hash(&head);
        head.extend_from_slice(&crc.to_le_bytes());
        let mut out = Crc {
            inner: out,
            hasher: crc32fast::Hasher::new(),
        };
        out.put(&head)?;
        Ok(Writer {
            out,
            totals: Totals::default(),
            next_offset: 0,
            target_size: header.target_size,
        })
    }

    fn record(&mut self, kind: u8, offset: u64, len: u64, data: &[u8]) -> anyhow::Result<()> {
        ensure!(len > 0, "empty diff record at offset {offset}");
        ensure!(
            offset >= self.next_offset && offset + len <= self.target_size,
            "diff record [{offset}, +{len}) out of order or beyond the end"
        );
        let mut head = [0u8; 17];
        head[0] = kind;
        head[1..9].copy_from_slice(&offset.to_le_bytes());
        head[9..17].copy_from_slice(&len.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&head);
        h.update(data);
        let crc = h.finalize();
        self.out.put(&head)?;
        self.out.put(data)?;
        self.out.put(&crc.to_le_bytes())?;
        self.next_offset = offset + len;
        self.totals.records += 1;
        Ok(())
    }

    /// A data record; longer data is split into records of at most [`MAX_DATA_RECORD`].
    pub fn data(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        let mut at = 0usize;
        while at < data.len() {
            let n = (data.len() - at).min(MAX_DATA_RECORD as usize);
            self.record(KIND_DATA, offset + at as u64, n as u64, &data[at..at + n])?;
            self.totals.data_bytes += n as u64;
            at += n;
        }
        Ok(())
    }

    /// A zero record: the range reads zeros in the target.
    pub fn zero(&mut self, offset: u64, len: u64) -> anyhow::Result<()> {
        self.record(KIND_ZERO, offset, len, &[])?;
        self.totals.zero_bytes += len;
        Ok(())
    }

    /// Writes the end marker and returns the writer and the totals.
    pub fn finish(mut self) -> anyhow::Result<(W, Totals)> {
        let mut end = [0u8; 25];
        end[0] = KIND_END;
        end[1..9].copy_from_slice(&self.totals.records.to_le_bytes());
        end[9..17].copy_from_slice(&self.totals.data_bytes.to_le_bytes());
        end[17..25].copy_from_slice(&self.totals.zero_bytes.to_le_bytes());
        self.out.put(&end)?;
        let crc = self.out.hasher.clone().finalize();
        self.out.inner.write_all(&crc.to_le_bytes())?;
        self.out.inner.flush()?;
        Ok((self.out.inner, self.totals))
    }
}

pub struct Reader<R: Read> {
    inner: R,
    hasher: crc32fast::Hasher,
    pub header: Header,
    totals: Totals,
    next_offset: u64,
    done: bool,
    /// Bytes consumed so far (for progress).
    pub position: u64,
}

impl<R: Read> Reader<R> {
    /// Reads the CRC32 (`what` in errors) that follows `parts` in the stream; whether it is
    /// theirs.
    fn checksum_matches(&mut self, parts: &[&[u8]], what: &str) -> anyhow::Result<bool> {
        let mut crc = [0u8; 4];
        self.take(&mut crc, what)?;
        let mut h = crc32fast::Hasher::new();
        for part in parts {
            h.update(part);
        }
        Ok(h.finalize() == u32::from_le_bytes(crc))
    }

    fn take(&mut self, buf: &mut [u8], what: &str) -> anyhow::Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                anyhow::anyhow!(
                    "the diff stream is truncated: it ends inside {what} at byte {}",
                    self.position
                )
            } else {
                anyhow::Error::new(e).context(format!("cannot read the diff stream ({what})"))
            }
        })?;
        self.hasher.update(buf);
        self.position += buf.len() as u64;
        Ok(())
    }

    /// Reads and checks the header.
    pub fn new(inner: R) -> anyhow::Result<Self> {
        let mut r = Reader {
            inner,
            hasher: crc32fast::Hasher::new(),
            header: Header {
                format: String::new(),
                version: 0,
                chunk_size: 0,
                target_size: 0,
                base: None,
                target: Identity {
                    volume: String::new(),
                    snapshot: String::new(),
                    size_bytes: 0,
                    created_unix: 0,
                    epoch: 0,
                    uuid: None,
                    volume_uuid: None,
                },
                created_unix: 0,
                tool: String::new(),
            },
            totals: Totals::default(),
            next_offset: 0,
            done: false,
            position: 0,
        };
        let mut fixed = [0u8; 16];
        r.take(&mut fixed, "the header")?;
        ensure!(
            &fixed[..8] == MAGIC,
            "not a blockd diff stream (bad magic; expected {:?})",
            String::from_utf8_lossy(MAGIC)
        );
        let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
        ensure!(
            version == VERSION,
            "diff stream version {version} is not supported (this blockctl reads version {VERSION})"
        );
        let json_len = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
        ensure!(
            json_len <= MAX_HEADER_JSON,
            "diff stream header of {json_len} bytes is larger than {MAX_HEADER_JSON}: corrupt"
        );
        let mut json = vec![0u8; json_len as usize];
        r.take(&mut json, "the header")?;
        ensure!(
            r.checksum_matches(&[&fixed, &json], "the header checksum")?,
            "the diff stream header is corrupt (checksum mismatch)"
        );
        r.header = serde_json::from_slice(&json).context("the diff stream header is not valid")?;
        ensure!(
            r.header.version == VERSION && r.header.target_size > 0 && r.header.chunk_size > 0,
            "the diff stream header is not valid (version, size or chunk size)"
        );
        Ok(r)
    }

    /// The next record, or None after a valid end marker (totals and stream CRC checked,
    /// nothing after it).
    pub fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        if self.done {
            return Ok(None);
        }
        let start = self.position;
        let mut kind = [0u8; 1];
        self.take(&mut kind, "a record")?;
        match kind[0] {
            KIND_END => {
                let mut end = [0u8; 24];
                self.take(&mut end, "the end marker")?;
                let expect_crc = self.hasher.clone().finalize();
                let mut crc = [0u8; 4];
                self.inner.read_exact(&mut crc).map_err(|_| {
                    anyhow::anyhow!("the diff stream is truncated: it ends inside the end marker")
                })?;
                self.position += 4;
                let word = |i: usize| u64::from_le_bytes(end[i..i + 8].try_into().expect("8"));
                let stated = Totals {
                    records: word(0),
                    data_bytes: word(8),
                    zero_bytes: word(16),
                };
                ensure!(
                    stated == self.totals,
                    "the diff stream's end marker states {stated:?} but the stream held {:?}: \
                     records are missing or duplicated",
                    self.totals
                );
                ensure!(
                    u32::from_le_bytes(crc) == expect_crc,
                    "the diff stream is corrupt (whole-stream checksum mismatch)"
                );
                let mut extra = [0u8; 1];
                match self.inner.read(&mut extra) {
                    Ok(0) => {}
                    Ok(_) => bail!("the diff stream has bytes after its end marker"),
                    Err(e) => return Err(anyhow::Error::new(e).context("reading the diff stream")),
                }
                self.done = true;
                Ok(None)
            }
            KIND_DATA | KIND_ZERO => {
                let mut head = [0u8; 16];
                self.take(&mut head, "a record header")?;
                let offset = u64::from_le_bytes(head[..8].try_into().expect("8"));
                let len = u64::from_le_bytes(head[8..].try_into().expect("8"));
                let is_data = kind[0] == KIND_DATA;
                ensure!(
                    len > 0 && (!is_data || len <= MAX_DATA_RECORD),
                    "corrupt diff record at byte {start}: length {len}"
                );
                let mut data = Vec::new();
                if is_data {
                    data = vec![0u8; len as usize];
                    self.take(&mut data, "a data record")?;
                }
                ensure!(
                    self.checksum_matches(&[&kind, &head, &data], "a record checksum")?,
                    "corrupt diff record at byte {start} (offset {offset}, length {len}): \
                     checksum mismatch"
                );
                ensure!(
                    offset >= self.next_offset,
                    "diff record at byte {start} (offset {offset}) is out of order: records \
                     must ascend without overlap"
                );
                ensure!(
                    offset
                        .checked_add(len)
                        .is_some_and(|e| e <= self.header.target_size),
                    "diff record at byte {start} (offset {offset}, length {len}) lies beyond \
                     the target size {}",
                    self.header.target_size
                );
                self.next_offset = offset + len;
                self.totals.records += 1;
                Ok(Some(if is_data {
                    self.totals.data_bytes += len;
                    Record::Data { offset, data }
                } else {
                    self.totals.zero_bytes += len;
                    Record::Zero { offset, len }
                }))
            }
            other => bail!("corrupt diff stream at byte {start}: unknown record kind {other:#04x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            format: "blockd-diff".into(),
            version: VERSION,
            chunk_size: 4096,
            target_size: 1 << 20,
            base: None,
            target: Identity {
                volume: "v".into(),
                snapshot: "s".into(),
                size_bytes: 1 << 20,
                created_unix: 1,
                epoch: 2,
                uuid: Some("3f1c0f6e-0000-4000-8000-000000000001".into()),
                volume_uuid: None,
            },
            created_unix: 3,
            tool: "test".into(),
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        w.data(0, &[7u8; 5000]).unwrap();
        w.zero(8192, 4096).unwrap();
        w.data(65536, &[9u8; 100]).unwrap();
        w.finish().unwrap().0
    }

    fn read_all(bytes: &[u8]) -> anyhow::Result<Vec<Record>> {
        let mut r = Reader::new(bytes)?;
        let mut v = Vec::new();
        while let Some(rec) = r.next_record()? {
            v.push(rec);
        }
        Ok(v)
    }

    #[test]
    fn a_stream_reads_back_as_written() {
        let recs = read_all(&sample()).unwrap();
        assert_eq!(
            recs,
            vec![
                Record::Data {
                    offset: 0,
                    data: vec![7; 5000]
                },
                Record::Zero {
                    offset: 8192,
                    len: 4096
                },
                Record::Data {
                    offset: 65536,
                    data: vec![9; 100]
                },
            ]
        );
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(read_all(&bad).is_err(), "flipped byte {i} accepted");
            assert!(read_all(&good[..i]).is_err(), "truncation at {i} accepted");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(read_all(&longer).is_err(), "trailing byte accepted");
    }

    #[test]
    fn reordered_and_dropped_records_are_refused() {
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        w.data(0, &[1u8; 10]).unwrap();
        let one = w.finish().unwrap().0;
        // Header length: 16 + json + 4; a data record of 10 bytes is 17 + 10 + 4.
        let json_len = u32::from_le_bytes(one[12..16].try_into().unwrap()) as usize;
        let hdr = 16 + json_len + 4;
        let rec = 31;
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        w.data(0, &[1u8; 10]).unwrap();
        w.data(100, &[2u8; 10]).unwrap();
        let two = w.finish().unwrap().0;
        let (a, b) = (&two[hdr..hdr + rec], &two[hdr + rec..hdr + 2 * rec]);
        let mut swapped = two[..hdr].to_vec();
        swapped.extend_from_slice(b);
        swapped.extend_from_slice(a);
        swapped.extend_from_slice(&two[hdr + 2 * rec..]);
        let err = read_all(&swapped).unwrap_err().to_string();
        assert!(err.contains("out of order"), "{err}");
        let mut dropped = two[..hdr + rec].to_vec();
        dropped.extend_from_slice(&two[hdr + 2 * rec..]);
        assert!(read_all(&dropped).is_err());
    }
}
