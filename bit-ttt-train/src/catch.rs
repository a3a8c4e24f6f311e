//! Turning a panic inside a dependency into an error, without its report on stderr: Burn and
//! cubecl panic on some bad inputs (a record whose tensor data does not fit its shape, a GPU
//! that is not there) where a typed error is due.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// Whether a panic on this thread is being caught by [`catch_quietly`].
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// How many [`catch_quietly_everywhere`] calls are running: while any is, no thread's panic
/// is reported.
static QUIET_EVERYWHERE: AtomicUsize = AtomicUsize::new(0);

/// Runs `f`, returning the message of a panic in it as `Err`; the panic hook stays silent for
/// this thread meanwhile (other threads' panics are reported as before).
pub(crate) fn catch_quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    let was = QUIET.with(|q| q.replace(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    outcome.map_err(message)
}

/// [`catch_quietly`], with every thread's panic report silenced meanwhile: opening a GPU
/// device starts the runtime's own threads, which panic too when there is no device.
pub(crate) fn catch_quietly_everywhere<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    QUIET_EVERYWHERE.fetch_add(1, Ordering::SeqCst);
    let outcome = catch_quietly(f);
    QUIET_EVERYWHERE.fetch_sub(1, Ordering::SeqCst);
    outcome
}

/// Wraps the panic hook once: it reports a panic unless its thread is in [`catch_quietly`] or
/// a [`catch_quietly_everywhere`] is running.
fn install_hook() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) && QUIET_EVERYWHERE.load(Ordering::SeqCst) == 0 {
                previous(info);
            }
        }));
    });
}

/// The message a panic carried.
fn message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown reason".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_values_pass_through() {
        assert_eq!(catch_quietly(|| 7), Ok(7));
        assert_eq!(
            catch_quietly(|| -> u8 { panic!("bad record {}", 3) }),
            Err("bad record 3".to_string())
        );
        assert_eq!(
            catch_quietly(|| -> u8 { panic!("static") }),
            Err("static".into())
        );
        assert!(!QUIET.with(Cell::get));
    }

    #[test]
    fn everywhere_catches_on_this_thread_and_lets_other_threads_run() {
        let outcome = catch_quietly_everywhere(|| {
            // A runtime thread that panics meanwhile: its report is silenced, its join
            // still sees the panic.
            let other = std::thread::spawn(|| panic!("runtime thread")).join();
            assert!(other.is_err());
            panic!("no adapter")
        });
        assert_eq!(outcome, Err::<(), _>("no adapter".into()));
        assert_eq!(QUIET_EVERYWHERE.load(Ordering::SeqCst), 0);
    }
}
