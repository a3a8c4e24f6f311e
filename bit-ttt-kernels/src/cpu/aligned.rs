//! Zero-initialised buffers whose start is 64-byte aligned (one cache line), for activations.
//!
//! A 32-byte SIMD load from an address that is not 32-byte aligned crosses a cache line every
//! other time and then costs two loads; the padded activation copies avoid that.

use std::marker::PhantomData;
use std::ops::Deref;

/// Element types for which all-zero bytes are a valid value and which have no padding.
///
/// # Safety
/// Implementors must be plain data: every byte pattern (in particular all zeros) is a valid
/// value, no padding bytes, alignment at most 64.
pub(crate) unsafe trait Plain: Copy {}

// SAFETY: primitive integers and floats are plain data of alignment <= 8.
unsafe impl Plain for i8 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// `len` zeroed values of `T` starting on a 64-byte boundary.
pub(crate) struct AlignedBuf<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Plain> AlignedBuf<T> {
    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        Self {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _t: PhantomData,
        }
    }

    /// The values, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `lines` holds at least `len · size_of::<T>()` initialised bytes, aligned to 64
        // (>= align_of::<T>()), and any bytes are a valid `T` (`Plain`). The slice borrows
        // `self` mutably, so it is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Plain> Deref for AlignedBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: as in `as_mut_slice`, shared.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<T>(), self.len) }
    }
}

/// Activations as the kernels read them: `[tokens, kp]`, zero-padded, 32-byte aligned rows
/// where possible.
pub(crate) enum Padded<'a, T: Plain> {
    /// The caller's buffer, already padded and aligned.
    Borrowed(&'a [T]),
    /// A padded, aligned copy.
    Owned(AlignedBuf<T>),
}

impl<T: Plain> Deref for Padded<'_, T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Self::Borrowed(x) => x,
            Self::Owned(b) => b,
        }
    }
}

/// `[tokens, cols]` values zero-padded to rows of `kp >= cols`. Borrowed when no padding is
/// needed and the buffer is already 32-byte aligned with 32-byte-multiple rows.
pub(crate) fn pad_rows<T: Plain>(x: &[T], tokens: usize, cols: usize, kp: usize) -> Padded<'_, T> {
    let row_bytes = kp * std::mem::size_of::<T>();
    if cols == kp && (x.as_ptr() as usize).is_multiple_of(32) && row_bytes.is_multiple_of(32) {
        return Padded::Borrowed(x);
    }
    let mut padded = AlignedBuf::zeroed(tokens * kp);
    if cols > 0 {
        for (dst, src) in padded
            .as_mut_slice()
            .chunks_exact_mut(kp)
            .zip(x.chunks_exact(cols))
        {
            dst[..cols].copy_from_slice(src);
        }
    }
    Padded::Owned(padded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_and_aligns() {
        let x: Vec<i8> = (1..=6).collect();
        let p = pad_rows(&x, 2, 3, 4);
        assert_eq!(&*p, &[1, 2, 3, 0, 4, 5, 6, 0]);
        assert!((p.as_ptr() as usize).is_multiple_of(64));
        let f = pad_rows(&[1.0f32, 2.0], 1, 2, 2);
        assert_eq!(&*f, &[1.0, 2.0]);
        assert!(pad_rows::<f32>(&[], 0, 0, 0).is_empty());
    }
}
