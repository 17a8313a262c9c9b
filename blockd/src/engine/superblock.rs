//! The pool superblock in chunk 0: identifies the pool so that a device is never used with
//! someone else's metadata.
//!
//! Layout (little-endian, in the first 4 KiB of the device):
//! `magic[8] | version u32 | uuid[16] | chunk_size u64 | size u64 | crc32 u32` where the
//! CRC covers every byte before it. The rest of chunk 0 is never allocated.

use crate::device::{AlignedBuf, BlockDevice};

use super::error::{EngineError, Result};

pub const MAGIC: &[u8; 8] = b"BLOCKDPL";
pub const VERSION: u32 = 1;
const LEN: usize = 8 + 4 + 16 + 8 + 8;
pub const BLOCK: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub chunk_size: u64,
    pub size: u64,
}

impl Superblock {
    pub fn encode(&self) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(BLOCK);
        buf[..8].copy_from_slice(MAGIC);
        buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
        buf[12..28].copy_from_slice(&self.uuid);
        buf[28..36].copy_from_slice(&self.chunk_size.to_le_bytes());
        buf[36..44].copy_from_slice(&self.size.to_le_bytes());
        let crc = crc32fast::hash(&buf[..LEN]);
        buf[LEN..LEN + 4].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes a superblock; `Ok(None)` when the block is all zeros (a blank device).
    pub fn decode(pool: &str, buf: &[u8]) -> Result<Option<Superblock>> {
        if buf.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let bad = |reason: String| EngineError::PoolMismatch {
            pool: pool.to_string(),
            reason,
        };
        if &buf[..8] != MAGIC {
            return Err(bad(
                "the device holds data that is not a blockd pool (no superblock magic); refusing to overwrite it".into(),
            ));
        }
        let word4 = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
        let word8 = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
        let crc = word4(LEN);
        if crc != crc32fast::hash(&buf[..LEN]) {
            return Err(bad("superblock checksum mismatch".into()));
        }
        let version = word4(8);
        if version != VERSION {
            return Err(bad(format!(
                "superblock version {version} is not supported (this build reads {VERSION})"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[12..28]);
        Ok(Some(Superblock {
            uuid,
            chunk_size: word8(28),
            size: word8(36),
        }))
    }

    pub fn read(pool: &str, dev: &dyn BlockDevice) -> Result<Option<Superblock>> {
        let mut buf = AlignedBuf::zeroed(BLOCK);
        dev.read_at(0, &mut buf)?;
        Self::decode(pool, &buf)
    }

    pub fn write(&self, dev: &dyn BlockDevice) -> Result<()> {
        dev.write_at(0, &self.encode())?;
        dev.flush()?;
        Ok(())
    }

    pub fn uuid_string(&self) -> String {
        uuid::Uuid::from_bytes(self.uuid).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let sb = Superblock {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            chunk_size: 65536,
            size: 1 << 30,
        };
        let buf = sb.encode();
        assert_eq!(Superblock::decode("p", &buf).unwrap(), Some(sb));
        assert_eq!(Superblock::decode("p", &[0u8; BLOCK]).unwrap(), None);
        let mut bad = buf.to_vec();
        bad[30] ^= 1;
        assert!(matches!(
            Superblock::decode("p", &bad),
            Err(EngineError::PoolMismatch { .. })
        ));
        let mut foreign = vec![0u8; BLOCK];
        foreign[100] = 7;
        assert!(matches!(
            Superblock::decode("p", &foreign),
            Err(EngineError::PoolMismatch { .. })
        ));
    }
}
