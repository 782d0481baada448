//! A password or token that never reaches a log: its `Debug` says only that it is
//! there, and it has no `Display`.

use std::fmt;
use std::sync::Arc;

/// A credential postern sends upstream.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place it is sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The largest secret file read: a refresh token or a JWT client secret is a few KiB;
/// anything far larger is the wrong file.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret from a file: one trailing newline (from `echo` or an editor) is not
/// part of it, and an empty file is an error.
pub fn read_file(flag: &str, path: &std::path::Path) -> Result<Secret, String> {
    use std::io::Read as _;
    let error = |why: String| format!("reading {flag} {}: {why}", path.display());
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_SECRET_FILE + 1).read_to_string(&mut text))
        .map_err(|e| error(e.to_string()))?;
    if text.len() as u64 > MAX_SECRET_FILE {
        return Err(error(format!("larger than {MAX_SECRET_FILE} bytes")));
    }
    let value = text.strip_suffix('\n').unwrap_or(&text);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(format!("{flag} {}: the file is empty", path.display()));
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
        assert_eq!(
            format!("{:?}", Some(secret.clone())),
            "Some(Secret([redacted]))"
        );
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn files_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        std::fs::write(&path, "pw \n").expect("write");
        assert_eq!(read_file("--x", &path).expect("read").expose(), "pw ");
        std::fs::write(&path, "\n").expect("write");
        assert!(read_file("--x", &path).is_err());
        assert!(read_file("--x", &dir.path().join("missing")).is_err());
        std::fs::write(&path, "x".repeat(MAX_SECRET_FILE as usize + 1)).expect("write");
        assert!(read_file("--x", &path).is_err());
    }
}
