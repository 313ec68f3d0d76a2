//! A minimal HTTP/1.1 GET against a local listener (the `/metrics`,
//! `/healthz`, `/readyz` port of `slipstream run` and `slipstream sync`).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP answer: the head (status line and headers, lower-cased) and body.
pub struct Answer {
    pub head: String,
    pub body: String,
}

impl Answer {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then_some(v.trim())
        })
    }
}

/// `GET path` on 127.0.0.1:`port`, with an optional `Accept`; `None` when
/// nothing answers.
pub async fn http_get(port: u16, path: &str, accept: Option<&str>) -> Option<Answer> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some(Answer {
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

/// The value of the first sample line starting with `line_prefix`.
pub fn metric_f64(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}
