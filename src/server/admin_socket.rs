//! The admin API's unix socket file: bound mode 0600 (only ringlb's user may connect), its
//! parent directory created if missing, a stale file left by a process that is gone replaced,
//! and the file removed when ringlb exits, unless an upgrade handed it to the next process.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::StartError;

/// The socket file ringlb bound (or took over).
#[derive(Debug)]
pub struct AdminSocket {
    pub path: PathBuf,
    /// The file's device, inode and change time: at exit, the file is removed only if it is
    /// still this one (an inode number alone may be reused by a file made since).
    id: (u64, u64, i64, i64),
}

fn error(path: &Path, message: impl Into<String>) -> StartError {
    StartError::AdminSocket { path: path.display().to_string(), message: message.into() }
}

impl AdminSocket {
    /// Binds `path`, or takes `inherited` (the same socket, from the process an upgrade
    /// replaces).
    /// With `owner` (uid, gid: the config's `user`), a new socket file belongs to that user, as
    /// does the directory made for it, so that the process can remove it after leaving root.
    pub fn bind(
        path: &Path,
        inherited: Option<UnixListener>,
        owner: Option<(u32, u32)>,
    ) -> Result<(UnixListener, AdminSocket), StartError> {
        let listener = match inherited {
            Some(listener) => listener,
            None => {
                let made_directory =
                    path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()).map(Path::to_path_buf);
                let listener = fresh(path)?;
                if let Some((uid, gid)) = owner {
                    for owned in made_directory.iter().map(PathBuf::as_path).chain([path]) {
                        std::os::unix::fs::chown(owned, Some(uid), Some(gid))
                            .map_err(|e| error(path, format!("cannot give {} to uid {uid}: {e}", owned.display())))?;
                    }
                }
                listener
            }
        };
        let metadata = std::fs::metadata(path).map_err(|e| error(path, format!("cannot stat it: {e}")))?;
        Ok((listener, AdminSocket { path: path.to_path_buf(), id: identity(&metadata) }))
    }

    /// Removes the file if it is still the socket this process bound.
    pub fn remove(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| identity(&m) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn identity(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

fn fresh(path: &Path) -> Result<UnixListener, StartError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| error(path, format!("cannot create its directory {}: {e}", parent.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(error(path, "another process is serving it (is ringlb already running?)")),
            // Nobody listens: a process that is gone left it.
            Err(_) => {
                std::fs::remove_file(path).map_err(|e| error(path, format!("cannot replace the stale socket: {e}")))?
            }
        },
        Ok(_) => return Err(error(path, "exists and is not a socket; remove it or choose another admin_socket")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(path, format!("cannot stat it: {e}"))),
    }
    // Created 0600 from the start (umask), not made so after: no moment where others may
    // connect. Only the main thread runs while ringlb starts.
    // SAFETY: umask only sets the process's file-creation mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask.
    unsafe { libc::umask(previous) };
    let listener = bound.map_err(|e| error(path, format!("cannot listen on it: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| error(path, format!("cannot make it private: {e}")))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_private_replaces_a_stale_one_and_refuses_a_live_one() {
        let dir = std::env::temp_dir().join(format!("ringlb-admin-{}", std::process::id()));
        let path = dir.join("sub/admin.sock");
        let (listener, socket) = AdminSocket::bind(&path, None, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // While it is served, a second ringlb may not take it.
        let error = AdminSocket::bind(&path, None, None).err().unwrap().to_string();
        assert!(error.contains("another process"), "{error}");
        // Once nobody listens, the file is stale and replaced.
        drop(listener);
        let (_listener, again) = AdminSocket::bind(&path, None, None).unwrap();
        // The first one's file is gone (replaced): removing it leaves the new one alone.
        socket.remove();
        assert!(path.exists());
        again.remove();
        assert!(!path.exists());
        std::fs::write(&path, "x").unwrap();
        let error = AdminSocket::bind(&path, None, None).err().unwrap().to_string();
        assert!(error.contains("is not a socket"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
