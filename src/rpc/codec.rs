//! The gRPC codec of every call: prost's, without the two copies tonic's defaults make of
//! each large message (a shard is 1 MiB).
//!
//! - Encoding: prost writes a message field by field into tonic's buffer, which grows as
//!   it goes; after a 1 MiB `bytes` field, the next small field made the buffer grow
//!   again, and the growth copied the shard once more. The buffer is now sized to the
//!   message before encoding.
//! - Decoding: tonic buffers the body and, once a message's length is known, reserves
//!   that much, which moved the first frame (up to 1 MiB) it already held. The decode
//!   buffer now starts large enough for a shard message. Its size is virtual until used:
//!   a small call touches a few bytes of it.
//!
//! Measured in a 512 MiB sequential write through the mount: these two growths were 6 %
//! of the mount's CPU and 2.6 % of a peer's.

use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::Status;

/// A shard message (1 MiB and a 64-byte tail, its header, framing) fits with room.
const DECODE_BUFFER_BYTES: usize = (1 << 20) + (64 << 10);
/// tonic's default: how much encoded output is gathered before it is handed to HTTP/2.
const YIELD_THRESHOLD: usize = 32 << 10;

#[derive(Debug, Clone)]
pub struct ProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(BufferSettings::new(DECODE_BUFFER_BYTES, YIELD_THRESHOLD))
    }
}

/// Encodes a message into a buffer reserved for its whole length first.
#[derive(Debug, Clone)]
pub struct SizedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf).map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
