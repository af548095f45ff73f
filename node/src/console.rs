//! What a `kizuna` subcommand shows on the terminal besides its output:
//! the [`Exit`] it ends with (a message and an exit code: 1 failure, 2 bad
//! input: config, import rows, usage) and progress bars on stderr.
//!
//! Every command function (`run`, `import`, `export`, `demo`) returns
//! `Result<_, Exit>`; only `main` prints the message and exits, so the
//! functions stay callable from tests and from each other.

/// An error with its exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl Exit {
    /// Exit code 2: the user's input (config, file, flags) is wrong.
    pub fn bad_input(message: impl Into<String>) -> Exit {
        Exit {
            code: 2,
            message: message.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Exit {
        let e: anyhow::Error = e.into();
        Exit {
            code: 1,
            message: format!("{e:#}"),
        }
    }
}

/// A progress bar of `len` steps on stderr (hidden when stderr is not a
/// terminal).
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}
