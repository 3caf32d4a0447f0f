//! An error as one line of text, for logs and for reasons kept on disk.

/// An error and its sources joined with ": " (what `{:#}` prints for an anyhow error); a source
/// whose text the line already holds is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store {0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("import failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn joins_sources_and_skips_repeated_text() {
        let io = || std::io::Error::new(std::io::ErrorKind::WouldBlock, "lock held");
        assert_eq!(
            super::error_chain(&Outer("/s", io())),
            "cannot open the store /s: lock held"
        );
        // The outer message already quotes its source: not twice.
        assert_eq!(
            super::error_chain(&Repeats(io())),
            "import failed: lock held"
        );
    }
}
