//! Starting a session's process as the requested local login: its home, shell,
//! groups and a clean environment, with privileges dropped when the node runs
//! as root, in a real PTY or with plain pipes.
//!
//! This module holds the crate's only `unsafe`: `pre_exec` hooks that run
//! between fork and exec (see the comment there).

use std::ffi::CString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;

use nix::unistd::{Gid, Uid, User};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

/// A local account sessions run as.
#[derive(Debug, Clone)]
pub struct LocalUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
    pub shell: PathBuf,
    groups: Vec<Gid>,
}

impl LocalUser {
    /// Looks the login up in the node's user database.
    pub fn lookup(login: &str) -> Result<Self, String> {
        let user = User::from_name(login)
            .map_err(|e| format!("cannot look up login {login:?} on this node: {e}"))?
            .ok_or_else(|| format!("login {login:?} does not exist on this node"))?;
        let cname = CString::new(login).map_err(|_| format!("login {login:?} has a NUL byte"))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid).unwrap_or_else(|_| vec![user.gid]);
        let shell = if user.shell.as_os_str().is_empty() {
            PathBuf::from("/bin/sh")
        } else {
            user.shell
        };
        let me = nix::unistd::geteuid();
        if !me.is_root() && me != user.uid {
            return Err(format!(
                "this node runs as uid {me} and cannot start sessions as login {login:?}; run the node as root or log in as the node's own user"
            ));
        }
        Ok(Self {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home: user.dir,
            shell,
            groups,
        })
    }

    fn default_path(&self) -> &'static str {
        if self.uid.is_root() {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        } else {
            "/usr/local/bin:/usr/bin:/bin:/usr/games"
        }
    }
}

/// What to run and with what environment.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `None`: the login shell; `Some`: `shell -c command`.
    pub command: Option<String>,
    /// A program to run directly instead of the shell (a subsystem server).
    pub program: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub term: Option<String>,
}

/// The session's whole environment: nothing leaks from the node's own.
fn environment(user: &LocalUser, launch: &Launch, pty: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("HOME".to_string(), user.home.to_string_lossy().into_owned()),
        ("USER".to_string(), user.name.clone()),
        ("LOGNAME".to_string(), user.name.clone()),
        (
            "SHELL".to_string(),
            user.shell.to_string_lossy().into_owned(),
        ),
        ("PATH".to_string(), user.default_path().to_string()),
    ];
    if pty {
        env.push((
            "TERM".to_string(),
            launch.term.clone().unwrap_or_else(|| "xterm".into()),
        ));
    }
    env.extend(launch.env.iter().cloned());
    env
}

fn working_dir(user: &LocalUser) -> PathBuf {
    if user.home.is_dir() {
        user.home.clone()
    } else {
        PathBuf::from("/")
    }
}

fn program_and_args(user: &LocalUser, launch: &Launch) -> (PathBuf, Vec<String>, Option<String>) {
    if let Some(program) = &launch.program {
        return (program.clone(), Vec::new(), None);
    }
    match &launch.command {
        Some(command) => (user.shell.clone(), vec!["-c".into(), command.clone()], None),
        None => {
            let base = user
                .shell
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".into());
            // A leading '-' in argv[0] asks the shell to act as a login shell.
            (user.shell.clone(), Vec::new(), Some(format!("-{base}")))
        }
    }
}

/// Returns the hook that drops to `user` (when we are root) and, if asked,
/// starts a new session so signals reach the whole process group.
fn drop_privileges(
    user: &LocalUser,
    new_session: bool,
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    let groups = user.groups.clone();
    let (uid, gid) = (user.uid, user.gid);
    let switch = nix::unistd::geteuid().is_root() && !uid.is_root();
    move || {
        if new_session {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
        }
        if switch {
            nix::unistd::setgroups(&groups).map_err(std::io::Error::from)?;
            nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
            nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
        }
        Ok(())
    }
}

/// A process on plain pipes.
#[derive(Debug)]
pub struct PipedProcess {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: ChildStdout,
    pub stderr: ChildStderr,
}

pub fn spawn_piped(user: &LocalUser, launch: &Launch) -> std::io::Result<PipedProcess> {
    let (program, args, arg0) = program_and_args(user, launch);
    let mut std_cmd = std::process::Command::new(&program);
    std_cmd.args(&args);
    if let Some(arg0) = arg0 {
        std_cmd.arg0(arg0);
    }
    std_cmd
        .env_clear()
        .envs(environment(user, launch, false))
        .current_dir(working_dir(user));
    std_cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[allow(unsafe_code)]
    // SAFETY: the hook runs in the forked child before exec. It calls only
    // setsid, setgroups, setgid and setuid, which are async-signal-safe system
    // calls, and allocates nothing: the group list was built before the fork.
    unsafe {
        std_cmd.pre_exec(drop_privileges(user, true));
    }
    let mut cmd = Command::from(std_cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let missing = || std::io::Error::other("child pipes missing");
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok(PipedProcess {
        child,
        stdin,
        stdout,
        stderr,
    })
}

/// A process on a new PTY of the given size.
pub fn spawn_pty(
    user: &LocalUser,
    launch: &Launch,
    size: pty_process::Size,
) -> std::io::Result<(Child, pty_process::Pty)> {
    let (pty, pts) = pty_process::open().map_err(std::io::Error::other)?;
    pty.resize(size).map_err(std::io::Error::other)?;
    chown_pts(&pts, user);
    let (program, args, arg0) = program_and_args(user, launch);
    let mut cmd = pty_process::Command::new(&program)
        .args(&args)
        .env_clear()
        .envs(environment(user, launch, true))
        .current_dir(working_dir(user));
    if let Some(arg0) = arg0 {
        cmd = cmd.arg0(arg0);
    }
    #[allow(unsafe_code)]
    // SAFETY: as in `spawn_piped`; pty-process runs its own setsid and
    // TIOCSCTTY first, so this hook does not start another session.
    let cmd = unsafe { cmd.pre_exec(drop_privileges(user, false)) };
    let child = cmd
        .kill_on_drop(true)
        .spawn(pts)
        .map_err(std::io::Error::other)?;
    Ok((child, pty))
}

/// Writes a session's input to its PTY. Not through pty-process's writer:
/// once the terminal's other side is closed with input still queued,
/// epoll keeps reporting the hang-up while write(2) says EAGAIN, and that
/// writer retries inside one poll forever, holding a runtime thread at 100%
/// CPU (seen with 1,000 sessions ending at once). Here a hang-up ends the
/// writing with `BrokenPipe`.
pub struct PtyInput(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl PtyInput {
    /// A writer of its own (a duplicate descriptor) to `pty`.
    pub fn new(pty: &impl std::os::fd::AsFd) -> std::io::Result<Self> {
        let fd = nix::unistd::dup(pty.as_fd())?;
        #[allow(unsafe_code)]
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd), which stays open and
        // the same descriptor until the AsyncFd is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE)
        };
        Ok(Self(registered.map_err(std::io::Error::from)?))
    }

    pub async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.0.writable().await?;
            let hung_up = guard.ready().is_write_closed();
            match guard.try_io(|fd| nix::unistd::write(fd, buf).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) if hung_up => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "the terminal was hung up",
                    ));
                }
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

/// Gives the PTY's slave device to the session's user, as sshd does, so that
/// programs reopening /dev/tty work.
fn chown_pts(pts: &pty_process::Pts, user: &LocalUser) {
    use std::os::fd::AsRawFd;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let link = format!("/proc/self/fd/{}", pts.as_raw_fd());
    if let Ok(path) = std::fs::read_link(link) {
        let _ = nix::unistd::chown(&path, Some(user.uid), Some(user.gid));
        let _ =
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o620));
    }
}
