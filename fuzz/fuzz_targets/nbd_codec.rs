//! Every decoder of `nbd_wire::codec` on arbitrary bytes: none may panic, and whatever
//! decodes re-encodes to the same message (the codec's round-trip invariant).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_wire::codec::*;

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the option code, the reply type and the chunk kind the rest
    // is decoded as, so that every branch of every decoder gets reached.
    let [a, b, c, d, rest @ ..] = data else {
        return;
    };
    let code = u32::from_be_bytes([0, 0, *a, *b]) % 16;
    let kind = u16::from_be_bytes([*c, *d]);

    if let Ok(opt) = ClientOption::decode(code, rest) {
        let bytes = opt.encode();
        let header = OptionHeader::decode(&bytes[..OPTION_HEADER_LEN]).expect("own header");
        let again = ClientOption::decode(header.option, &bytes[OPTION_HEADER_LEN..]);
        // NBD_OPT_ABORT ignores its data, so only the option itself must survive.
        assert_eq!(again.as_ref(), Ok(&opt));
    }

    let reply_types = [
        NBD_REP_ACK,
        NBD_REP_SERVER,
        NBD_REP_INFO,
        NBD_REP_META_CONTEXT,
        NBD_REP_FLAG_ERROR | code,
    ];
    let header = OptionReplyHeader {
        option: code,
        reply: reply_types[kind as usize % reply_types.len()],
        len: rest.len() as u32,
    };
    if let Ok(reply) = OptionReply::decode(&header, rest) {
        let bytes = reply.encode();
        let h = OptionReplyHeader::decode(&bytes[..OPTION_REPLY_HEADER_LEN]).expect("own header");
        assert_eq!(OptionReply::decode(&h, &bytes[OPTION_REPLY_HEADER_LEN..]), Ok(reply));
    }

    let kinds = [
        NBD_REPLY_TYPE_NONE,
        NBD_REPLY_TYPE_OFFSET_DATA,
        NBD_REPLY_TYPE_OFFSET_HOLE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        NBD_REPLY_TYPE_ERROR,
        NBD_REPLY_TYPE_ERROR_OFFSET,
        kind,
    ];
    let chunk = ChunkHeader {
        flags: kind,
        kind: kinds[code as usize % kinds.len()],
        cookie: 7,
        length: rest.len() as u32,
    };
    if let Ok(reply) = StructuredReply::decode(&chunk, rest) {
        let bytes = reply.encode();
        let h = ChunkHeader::decode(&bytes[..CHUNK_HEADER_LEN]).expect("own header");
        assert_eq!(StructuredReply::decode(&h, &bytes[CHUNK_HEADER_LEN..]), Ok(reply));
    }

    // Fixed-size messages re-encode byte for byte.
    if let Ok(g) = Greeting::decode(data) {
        assert_eq!(&g.encode()[..], data);
    }
    if let Ok(h) = OptionHeader::decode(data) {
        assert_eq!(&h.encode()[..], data);
    }
    let _ = ClientFlags::decode(data, NBD_FLAG_NO_ZEROES);
    let _ = OptionReplyHeader::decode(data);
});
