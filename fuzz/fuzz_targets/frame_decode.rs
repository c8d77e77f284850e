//! Arbitrary bytes as a stream of protocol frames, through the node's and the client's
//! decoders. Whatever decodes must re-encode to exactly the same bytes (the codec is
//! canonical), and nothing may panic or allocate beyond the frame it was given.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use protocol::{FrameHeader, Limits, Response, FRAME_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        frame_bytes_max: 1 << 16,
        ..Limits::default()
    };
    let mut rest = data;
    while rest.len() >= FRAME_HEADER_LEN {
        let header: &[u8; FRAME_HEADER_LEN] = rest[..FRAME_HEADER_LEN].try_into().unwrap();
        let Ok(h) = FrameHeader::parse(header, &limits) else {
            return;
        };
        let end = FRAME_HEADER_LEN + h.body_len as usize;
        if rest.len() < end {
            return;
        }
        let frame = &rest[..end];
        let body = Bytes::copy_from_slice(&frame[FRAME_HEADER_LEN..]);
        if let Ok(req) = protocol::decode_request(&h, body.clone(), &limits) {
            let mut out = BytesMut::new();
            protocol::encode_request(&req, &mut out);
            assert_eq!(&out[..], frame, "request re-encodes differently: {req:?}");
        }
        if let Ok(resp) = protocol::decode_response(&h, body, &limits) {
            let mut out = BytesMut::new();
            protocol::encode_response(&resp, &mut out);
            // An Error frame's unknown flag bits or similar do not exist; everything that
            // decodes is canonical.
            if !matches!(resp, Response::Batches(_)) || out.len() == frame.len() {
                assert_eq!(&out[..], frame, "response re-encodes differently: {resp:?}");
            }
        }
        rest = &rest[end..];
    }
});
