//! Request bodies as byte streams that fail when the client stops sending: a PATCH whose
//! body never arrives must not hold its upload session (and a connection) forever.

use std::time::Duration;

use futures::StreamExt;
use poem::Body;

use ferry_core::ByteStream;

/// The body as a stream; a gap of more than `idle` between two chunks ends it with an error.
pub fn stream(body: Body, idle: Duration) -> ByteStream {
    let inner = body.into_bytes_stream().boxed();
    futures::stream::unfold(Some(inner), move |state| async move {
        let mut inner = state?;
        match tokio::time::timeout(idle, inner.next()).await {
            Ok(Some(item)) => Some((item, Some(inner))),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the request body sent nothing for {} s", idle.as_secs()),
                )),
                None,
            )),
        }
    })
    .boxed()
}
