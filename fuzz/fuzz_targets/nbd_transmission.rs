//! The transmission phase: request headers as a server (blockd, csi-nbd-proxy) decodes
//! them, and simple and structured replies as a client decodes them, on arbitrary bytes.
//! Fixed-size headers that decode must re-encode byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_wire::codec::{
    ChunkHeader, Request, SimpleReply, StructuredReply, CHUNK_HEADER_LEN, REQUEST_LEN,
    SIMPLE_REPLY_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::decode(data) {
        assert_eq!(data.len(), REQUEST_LEN);
        assert_eq!(&req.encode()[..], data);
        let _ = (req.has_payload(), req.command.name());
    }
    if let Ok(reply) = SimpleReply::decode(data) {
        assert_eq!(data.len(), SIMPLE_REPLY_LEN);
        assert_eq!(&reply.encode()[..], data);
    }
    // A chunk header followed by its payload, as a client reads them off the socket.
    if data.len() >= CHUNK_HEADER_LEN {
        let (head, payload) = data.split_at(CHUNK_HEADER_LEN);
        if let Ok(header) = ChunkHeader::decode(head) {
            assert_eq!(&header.encode()[..], head);
            if let Ok(reply) = StructuredReply::decode(&header, payload) {
                assert_eq!(reply.encode(), data);
            }
        }
    }
});
