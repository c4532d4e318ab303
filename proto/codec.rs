//! The protobuf codec of the agent protocol: prost's, with 1 KiB buffers instead of tonic's
//! 8 KiB. The operator keeps one status stream open per pod, so at 10,000 pods the default
//! decode buffer alone would hold 80 MiB; status reports are a few hundred bytes and a buffer
//! grows when a larger message (a log chunk) arrives.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of every encode and decode buffer, and the step it grows by.
pub const BUFFER_SIZE: usize = 1024;
/// Bytes encoded before a streaming response yields to the runtime (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// The codec named in `build.rs` for the generated client and server.
#[derive(Debug, Clone, Copy)]
pub struct AgentCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for AgentCodec<T, U> {
    fn default() -> Self {
        AgentCodec { _types: PhantomData }
    }
}

impl<T, U> Codec for AgentCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codec::{Decoder, Encoder};

    #[test]
    fn buffers_are_small() {
        let mut codec = AgentCodec::<crate::v1::PingRequest, crate::v1::PingResponse>::default();
        let expected = format!("buffer_size: {BUFFER_SIZE},");
        assert!(format!("{:?}", codec.encoder().buffer_settings()).contains(&expected));
        assert!(format!("{:?}", codec.decoder().buffer_settings()).contains(&expected));
    }
}
