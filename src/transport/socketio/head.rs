//! socketioxide keeps each socket's request head (`req_parts`) for as long as the socket
//! lives. hyper parses header values and the URI as slices of the connection's read buffer,
//! so a kept head keeps that whole buffer (16 KiB per connection, measured): about half of
//! what an idle socket.io connection cost. Copied out, the head costs its own few hundred
//! bytes and the buffer is freed once the connection is upgraded.

use axum::extract::{OriginalUri, Request};
use axum::http::{HeaderMap, HeaderValue, Uri};

/// Gives a socket.io request a head of its own; other requests pass untouched.
pub(in crate::transport) async fn detach_head(mut request: Request) -> Request {
    if request.uri().path().starts_with("/socket.io") {
        detach(&mut request);
    }
    request
}

fn detach(request: &mut Request) {
    let shared = std::mem::take(request.headers_mut());
    let mut own = HeaderMap::with_capacity(shared.len());
    for (name, value) in &shared {
        // Copies the bytes; a value that was valid stays valid.
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        own.append(name.clone(), copy);
    }
    *request.headers_mut() = own;
    if let Some(uri) = own_uri(request.uri()) {
        *request.uri_mut() = uri;
    }
    // axum's router keeps the URI as it came, in an extension: one more slice of the buffer.
    if let Some(OriginalUri(original)) = request.extensions_mut().get_mut::<OriginalUri>()
        && let Some(uri) = own_uri(original)
    {
        *original = uri;
    }
}

/// The same URI over bytes of its own: parsing its text copies them.
fn own_uri(uri: &Uri) -> Option<Uri> {
    uri.to_string().parse().ok()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use bytes::Bytes;

    use super::*;

    /// A request whose URI (also as axum's `OriginalUri`) and header values are slices of one
    /// buffer, `<uri> <value>`, as hyper and axum make them.
    fn request_over(buffer: &Bytes) -> Request {
        let space = buffer.iter().position(|b| *b == b' ').expect("a space");
        let uri = Uri::from_maybe_shared(buffer.slice(..space)).expect("uri");
        let value = HeaderValue::from_maybe_shared(buffer.slice(space + 1..)).expect("value");
        let mut request = Request::new(Body::empty());
        request.extensions_mut().insert(OriginalUri(uri.clone()));
        *request.uri_mut() = uri;
        request.headers_mut().append("cookie", value.clone());
        request.headers_mut().append("cookie", value);
        request
    }

    #[tokio::test]
    async fn a_socketio_head_no_longer_holds_the_read_buffer() {
        let buffer = Bytes::from_static(b"/socket.io/?EIO=4&transport=websocket session=abc");
        let buffer = Bytes::from(buffer.to_vec());
        let request = detach_head(request_over(&buffer)).await;
        assert!(buffer.is_unique(), "the head still refers to the read buffer");
        assert_eq!(request.uri().path(), "/socket.io/");
        assert_eq!(request.uri().query(), Some("EIO=4&transport=websocket"));
        let original = request.extensions().get::<OriginalUri>().map(|o| o.0.clone());
        assert_eq!(original.as_ref(), Some(request.uri()));
        let cookies: Vec<_> = request.headers().get_all("cookie").iter().collect();
        assert_eq!(cookies, ["session=abc", "session=abc"]);
    }

    #[tokio::test]
    async fn other_requests_are_left_as_they_are() {
        let buffer = Bytes::from(b"/messages?x=1 session=abc".to_vec());
        let request = detach_head(request_over(&buffer)).await;
        assert!(!buffer.is_unique());
        drop(request);
        assert!(buffer.is_unique());
    }
}
