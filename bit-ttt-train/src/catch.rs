//! Turning a panic inside a dependency into an error, without its report on stderr: Burn and
//! cubecl panic on some bad inputs (a record whose tensor data does not fit its shape, a GPU
//! that is not there) where a typed error is due.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};

thread_local! {
    /// Whether a panic on this thread is being caught by [`catch_quietly`].
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, returning the message of a panic in it as `Err`; the panic hook stays silent for
/// this thread meanwhile (other threads' panics are reported as before).
pub(crate) fn catch_quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    outcome.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown reason".into())
    })
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
}
