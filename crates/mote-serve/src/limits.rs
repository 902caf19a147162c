//! Limits that no request can break. Every limit has a flag of `mote serve` that raises it,
//! and a request over one is refused with the protocol's own error shape naming the limit
//! and that flag: 413 for sizes (body, inputs, tokens, prompt bytes, tensor elements), 422
//! for counts in a request's options (stop strings), 429 when the server's shared budgets
//! (queue, in-flight body bytes, connections) are in use. The defaults keep a 2-core,
//! 4 GiB machine alive under any one request and under many at once.

use std::time::Duration;

use axum::http::StatusCode;

/// Per-request limits.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Largest request body, in bytes (`--max-body-mib`).
    pub max_body: usize,
    /// Bytes of request bodies held in memory at once, across all requests
    /// (`--max-inflight-body-mib`); past it a request is answered 429 while its body
    /// arrives.
    pub max_inflight_body: usize,
    /// Time to receive a whole request body (`--body-timeout-s`; slow senders are cut off).
    pub body_timeout: Duration,
    /// Texts or images in one request (`--max-inputs`).
    pub max_inputs: usize,
    /// Tokens of one embedding request after truncation (`--max-request-tokens`).
    pub max_request_tokens: usize,
    /// Bytes of one prompt or of one chat's messages (`--max-prompt-bytes`), checked
    /// before tokenising.
    pub max_prompt_bytes: usize,
    /// Tokens one generation may produce; `max_tokens` above it is clamped
    /// (`--max-new-tokens`).
    pub max_new_tokens: usize,
    /// Stop strings in one request (`--max-stop`).
    pub max_stop: usize,
    /// Bytes of one stop string (`--max-stop-bytes`).
    pub max_stop_bytes: usize,
    /// Elements of one KServe tensor (`--max-tensor-elements`).
    pub max_tensor_elements: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_body: 16 << 20,
            max_inflight_body: 256 << 20,
            body_timeout: Duration::from_secs(30),
            max_inputs: 256,
            max_request_tokens: 65536,
            max_prompt_bytes: 1 << 20,
            max_new_tokens: 4096,
            max_stop: 16,
            max_stop_bytes: 256,
            max_tensor_elements: 16 << 20,
        }
    }
}

/// How many body bytes one byte of prompt text can take in a generation request: JSON
/// escapes a byte as at most six (`\u0000`), and the rest of the request (roles, options,
/// a response schema) is small next to it.
pub const BODY_BYTES_PER_PROMPT_BYTE: usize = 8;

impl RequestLimits {
    /// The largest body a request to `path` may send, and the flag that raises it. The
    /// generation routes carry one prompt, so their bodies are bounded by
    /// `--max-prompt-bytes` too: a larger one is refused from its `Content-Length`, before
    /// any of it is read or parsed.
    pub fn body_limit(&self, path: &str) -> (usize, &'static str) {
        let generation = matches!(path, "/v1/completions" | "/v1/chat/completions");
        let by_prompt = self
            .max_prompt_bytes
            .saturating_mul(BODY_BYTES_PER_PROMPT_BYTE)
            .max(64 << 10);
        if generation && by_prompt < self.max_body {
            (by_prompt, "--max-prompt-bytes")
        } else {
            (self.max_body, "--max-body-mib")
        }
    }
}

/// Connection limits.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Open connections (`--max-connections`); one more is closed at once.
    pub max_connections: usize,
    /// Time for a client to send a request's headers, from its first byte or from the
    /// end of the previous response on a kept-alive connection (`--header-timeout-s`).
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// A request over a limit: the status, and a message naming the limit and its flag.
#[derive(Debug)]
pub struct OverLimit {
    /// 413, 422 or 429.
    pub status: StatusCode,
    /// What was over which limit, and how to raise it.
    pub message: String,
}

impl OverLimit {
    /// A size over its limit (413).
    pub fn size(what: &str, got: impl std::fmt::Display, limit: usize, flag: &str) -> OverLimit {
        OverLimit {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "{what}: {got} is more than this server's limit of {limit}; \
                 send less per request, or start the server with a larger {flag}"
            ),
        }
    }

    /// A count in the request's options over its limit (422).
    pub fn count(what: &str, got: impl std::fmt::Display, limit: usize, flag: &str) -> OverLimit {
        OverLimit {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!(
                "{what}: {got} is more than this server's limit of {limit}; \
                 start the server with a larger {flag} to allow more"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_bodies_are_bounded_by_the_prompt_limit() {
        let l = RequestLimits::default();
        assert_eq!(l.body_limit("/v1/embeddings"), (16 << 20, "--max-body-mib"));
        assert_eq!(
            l.body_limit("/v2/models/m/infer"),
            (16 << 20, "--max-body-mib")
        );
        assert_eq!(
            l.body_limit("/v1/chat/completions"),
            (8 << 20, "--max-prompt-bytes")
        );
        // A prompt limit that allows more than the body limit leaves the body limit.
        let big = RequestLimits {
            max_prompt_bytes: 4 << 20,
            ..RequestLimits::default()
        };
        assert_eq!(
            big.body_limit("/v1/completions"),
            (16 << 20, "--max-body-mib")
        );
    }
}
