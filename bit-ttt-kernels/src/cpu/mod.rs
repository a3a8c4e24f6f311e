//! CPU kernels: matrix products of packed ternary weights, and the f32 math of a fused decode
//! step around them.
//!
//! `y[t, r] = Σ_k W[r, k] · x[t, k]` for a batch of `t` tokens, where `W` is a packed ternary
//! matrix ([`PackedTernary`](crate::PackedTernary) or a borrowed [`TernaryView`], for example one
//! pointing into the memory-mapped packed model file of `bit-ttt-burn`). Two activation formats:
//! - **W1.58A8** ([`QuantizedActivations`]): int8 activations with one scale per token,
//!   integer accumulation, one float multiply at the end: `y = acc · gamma / s_t`.
//! - **W1.58A16** (plain f32 activations), for experiments with activation quantization off.
//!
//! # Entry points
//! [`gemm_i8`] and [`gemm_f32`] pick the best kernel for this CPU and split the output rows over
//! this crate's own thread pool; one token is the decode GEMV, many tokens the prefill GEMM.
//! [`gemm_i8_with`] and [`gemm_f32_with`] take [`CpuOptions`] to force a kernel or a thread count
//! for one call; [`set_kernel_choice`] and [`set_num_threads`] change the defaults.
//! [`gemm_i8_many_with`] multiplies several matrices with the same activations in one call (one
//! parallel region, the activations prepared once).
//!
//! # Threads
//! The rows are split over a rayon pool of this crate (one pool per thread count asked for).
//! A call from an ordinary thread works on its chunks itself while `threads - 1` workers of the
//! pool, woken for it, join in; a worker that wakes after the work is done still costs the
//! caller that wake-up, so calls smaller than about 10 µs of work stay on the calling thread.
//! Run a decode step inside [`install`] instead: calls made from a worker of the pool split even
//! small matrices (a few µs of work) among warm workers. The chunks shrink toward the end of a
//! call and are taken in order, so the threads finish close together.
//!
//! # Kernels
//! - [`reference`]: scalar loops, always available, the ground truth. The fast W1.58A8 kernels
//!   produce bit-identical outputs: the integer sums are exact and the final scaling is the same
//!   expression ([`finish_i8`]).
//! - `avx2` (x86_64 with AVX2 and FMA, detected at run time): see the module source for the
//!   decoding scheme.
//! - No AVX-512 / VNNI kernel: the development machine (AMD EPYC, Zen 3) has no AVX-512, so such
//!   a kernel could be neither tested nor measured here. On other architectures the reference
//!   kernel is used.
//!
//! # Decode math
//! What a fused decoder computes besides the ternary products, on plain f32 slices, each
//! following the recipe of the Burn op it stands in for so the two paths agree:
//! - [`math`]: RMSNorm, LayerNorm and its fused L2 backward, SiLU ([`silu_mul`], with an AVX2
//!   kernel), GELU, the η gate's sigmoid, RoPE, `axpy`, `dot`, vector-matrix products.
//! - [`dense`]: the product of one token with a full-precision f32 matrix ([`gemv_f32_dense`]).
//! - [`ttt_head`]: one head of one token through a TTT layer's primal form
//!   ([`TttStep::run_head`]), generic code with a twin compiled for AVX2 and FMA, chosen by a
//!   [`KernelChoice`] as the products are.

pub mod activations;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod aligned;
#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod dense;
pub mod int8_rows;
pub mod math;
pub mod reference;
pub mod ttt_head;

pub use activations::QuantizedActivations;
pub use dense::gemv_f32_dense;
pub use int8_rows::{dot_i8, dot_i8_scalar, Int8Rows};
pub use math::{
    add_vec_mat, axpy, dot, gelu_tanh, gelu_tanh_bwd, layer_norm, ln_l2_bwd, relu2_mul, rms_norm,
    rope_angles, rotate_pairs, sigmoid_tanh, silu, silu_mul, silu_mul_scalar, ternary_ste_offset,
};
pub use ttt_head::{TttHeadInputs, TttHeadState, TttInner, TttLayerParams, TttStep};

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[cfg(target_arch = "x86_64")]
use aligned::pad_rows;

use crate::packing::{TernaryView, QK_TERNARY};
use crate::KernelError;

/// The `gamma / s_t` factor of a W1.58A8 output; every kernel uses this expression.
#[inline]
pub fn i8_factor(gamma: f32, s_t: f32) -> f32 {
    gamma / s_t
}

/// The final W1.58A8 output from the exact integer sum and [`i8_factor`]; every kernel uses it,
/// so their outputs are bit-identical.
#[inline]
pub fn finish_i8(acc: i32, factor: f32) -> f32 {
    acc as f32 * factor
}

/// The final W1.58A16 output from the unscaled sum and `gamma`.
#[inline]
pub fn finish_f32(acc: f32, gamma: f32) -> f32 {
    acc * gamma
}

/// Which kernel runs a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelChoice {
    /// The fastest kernel this CPU can run (AVX2 where present, else the reference).
    Auto,
    /// The scalar [`reference`] kernel (still multi-threaded through the pool).
    Reference,
    /// The AVX2 kernel (x86_64 with AVX2 and FMA only).
    Avx2,
}

impl KernelChoice {
    fn to_u8(self) -> u8 {
        match self {
            Self::Auto => 0,
            Self::Reference => 1,
            Self::Avx2 => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Reference,
            2 => Self::Avx2,
            _ => Self::Auto,
        }
    }

    /// Whether this CPU can run the kernel (`Auto` and `Reference` always can).
    pub fn is_available(self) -> bool {
        match self {
            Self::Auto | Self::Reference => true,
            Self::Avx2 => avx2_available(),
        }
    }

    /// The concrete kernel this choice runs on this CPU (`Auto` resolved).
    ///
    /// # Errors
    /// [`KernelError::KernelUnavailable`] if the CPU cannot run the kernel.
    pub fn resolve(self) -> Result<KernelChoice, KernelError> {
        match self {
            Self::Auto if avx2_available() => Ok(Self::Avx2),
            Self::Auto | Self::Reference => Ok(Self::Reference),
            Self::Avx2 if avx2_available() => Ok(Self::Avx2),
            Self::Avx2 => Err(KernelError::KernelUnavailable("AVX2")),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    avx2::available()
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

/// For tests that compare a SIMD build with the scalar reference: whether the AVX2 kernels run
/// on this CPU. Where they do not, the test can only compare the reference with itself, so this
/// prints that `what` was not tested and why; with `BIT_TTT_REQUIRE_AVX2=1` (CI sets it on
/// x86_64) it panics instead, so such a comparison cannot pass without having run.
///
/// # Panics
/// If `BIT_TTT_REQUIRE_AVX2=1` and the CPU has no AVX2+FMA.
pub fn avx2_under_test(what: &str) -> bool {
    if avx2_available() {
        return true;
    }
    assert!(
        std::env::var("BIT_TTT_REQUIRE_AVX2").as_deref() != Ok("1"),
        "BIT_TTT_REQUIRE_AVX2=1 but this CPU has no AVX2+FMA: {what} cannot be tested"
    );
    println!(
        "AVX2+FMA not available on this CPU: {what} compared the scalar reference with itself only"
    );
    false
}

/// The concrete kernels this CPU can run, reference first.
pub fn available_kernels() -> Vec<KernelChoice> {
    [KernelChoice::Reference, KernelChoice::Avx2]
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
}

static KERNEL_CHOICE: AtomicU8 = AtomicU8::new(0);
static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the kernel that [`gemm_i8`] and [`gemm_f32`] use (default [`KernelChoice::Auto`]).
///
/// # Errors
/// [`KernelError::KernelUnavailable`] (and nothing changes) if the CPU cannot run it.
pub fn set_kernel_choice(choice: KernelChoice) -> Result<(), KernelError> {
    choice.resolve()?;
    KERNEL_CHOICE.store(choice.to_u8(), Ordering::Relaxed);
    Ok(())
}

/// The kernel choice [`gemm_i8`] and [`gemm_f32`] use.
pub fn kernel_choice() -> KernelChoice {
    KernelChoice::from_u8(KERNEL_CHOICE.load(Ordering::Relaxed))
}

/// Sets the number of threads of the default calls; `0` means one per available CPU.
pub fn set_num_threads(threads: usize) {
    NUM_THREADS.store(threads, Ordering::Relaxed);
}

/// The number of threads [`gemm_i8`] and [`gemm_f32`] use.
pub fn num_threads() -> usize {
    match NUM_THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Per-call settings of [`gemm_i8_with`] and [`gemm_f32_with`]; `None` takes the global setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// The kernel, or `None` for [`kernel_choice`].
    pub kernel: Option<KernelChoice>,
    /// The thread count, or `None` for [`num_threads`]. `Some(1)` runs on the calling thread.
    pub threads: Option<usize>,
}

impl CpuOptions {
    /// Options forcing a kernel and a thread count.
    pub fn new(kernel: KernelChoice, threads: usize) -> Self {
        Self {
            kernel: Some(kernel),
            threads: Some(threads),
        }
    }
}

/// The rayon pools of this crate, one per thread count asked for (usually just one).
static POOLS: Mutex<Vec<Arc<rayon::ThreadPool>>> = Mutex::new(Vec::new());

fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pools.iter().find(|p| p.current_num_threads() == threads) {
        return Some(Arc::clone(p));
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bit-ttt-cpu-{i}"))
        .build()
        .ok()?;
    let built = Arc::new(built);
    pools.push(Arc::clone(&built));
    Some(built)
}

/// Runs `f` on a thread of this crate's pool of `threads` threads (`0`: [`num_threads`]).
///
/// Products called inside `f` with the same thread count then split their rows among warm
/// workers directly, instead of handing each call to the pool and sleeping until it is done.
/// That hand-off costs several microseconds per call (a wake-up of a sleeping thread), which
/// matters for small matrices: run a whole decode step inside `install`.
pub fn install<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let threads = if threads == 0 { num_threads() } else { threads };
    match pool(threads) {
        Some(p) if threads > 1 => p.install(f),
        _ => f(),
    }
}

/// Below this many block·token products (about 10 µs of decode work) a call from outside the
/// pool stays on its own thread: the caller works from the start ([`run_with_caller`]), but a
/// worker that wakes only after the work is done still makes it wait for that wake-up, several
/// microseconds (more in a virtual machine).
const MIN_PARALLEL_WORK: usize = 8 * 1024;
/// The same limit for a call from a worker of the pool ([`install`]), where splitting is cheap.
const MIN_PARALLEL_WORK_IN_POOL: usize = 2 * 1024;
/// The smallest chunks of a call (the last ones) hold `1 / (threads · this)` of its work, or
/// the least work worth splitting: smaller tails leave the threads less idle at a call's end
/// (measured against 8 in `docs/measurements.md`).
const TAIL_CHUNKS_PER_THREAD: usize = 16;

/// One matrix of a [`for_row_chunks`] call: its rows, its blocks per row and its
/// `[tokens, rows]` output.
struct ChunkedProduct<'o> {
    rows: usize,
    bpr: usize,
    out: &'o mut [f32],
}

/// A chunk of a [`for_row_chunks`] call: the matrix, its first row, and per token the slice
/// of the output for its rows.
type RowChunk<'o> = (usize, usize, Vec<&'o mut [f32]>);

/// Splits the outputs of one or more products with the same tokens into row chunks and runs
/// `f(matrix, r0, outs)` on each, where `outs[t]` is token `t`'s slice of the chunk; on the pool
/// ([`guided_chunks`], [`run_with_caller`]) when there is enough work. All chunks of all
/// matrices form one parallel region, so products that read the same input (a layer's Q, K and
/// V) cost one fork and join, not one each.
fn for_row_chunks<F>(products: Vec<ChunkedProduct<'_>>, tokens: usize, threads: usize, f: F)
where
    F: Fn(usize, usize, &mut [&mut [f32]]) + Sync,
{
    let work: usize = products
        .iter()
        .map(|p| p.rows * p.bpr.max(1))
        .sum::<usize>()
        * tokens;
    if work == 0 {
        return;
    }
    let pool = if threads > 1 { pool(threads) } else { None };
    let min_work = match &pool {
        Some(p) if p.current_thread_index().is_some() => MIN_PARALLEL_WORK_IN_POOL,
        _ => MIN_PARALLEL_WORK,
    };
    let pool = pool.filter(|_| work >= 2 * min_work);
    let Some(pool) = pool else {
        for (m, p) in products.into_iter().enumerate().filter(|(_, p)| p.rows > 0) {
            let mut outs: Vec<&mut [f32]> = p.out.chunks_mut(p.rows).collect();
            f(m, 0, &mut outs);
        }
        return;
    };
    let tail_work = (work / (threads * TAIL_CHUNKS_PER_THREAD)).max(min_work);
    let chunks = guided_chunks(products, tokens, threads, work, tail_work);
    run_with_caller(&pool, threads, chunks, &f);
}

/// Cuts the products into chunks of decreasing size, in order: each takes `1 / (2·threads)` of
/// the work left, down to `tail_work` (and a product's last rows may form a smaller one).
/// Threads take them in order ([`run_with_caller`]): large chunks first keep the number of
/// chunk starts low (each restarts a memory stream), small ones last keep the threads'
/// finishing times close.
fn guided_chunks<'o>(
    products: Vec<ChunkedProduct<'o>>,
    tokens: usize,
    threads: usize,
    work: usize,
    tail_work: usize,
) -> Vec<RowChunk<'o>> {
    let mut chunks: Vec<RowChunk<'o>> = Vec::new();
    let mut left = work;
    for (m, p) in products.into_iter().enumerate().filter(|(_, p)| p.rows > 0) {
        let row_work = p.bpr.max(1) * tokens;
        // The chunks' row ranges first, then the outputs split along them.
        let first = chunks.len();
        let mut r0 = 0;
        while r0 < p.rows {
            let chunk_work = (left / (2 * threads)).max(tail_work);
            // A multiple of 4 rows (the GEMV kernel's row blocking).
            let rows = (chunk_work.div_ceil(row_work).div_ceil(4) * 4).min(p.rows - r0);
            chunks.push((m, r0, Vec::with_capacity(tokens)));
            left = left.saturating_sub(rows * row_work);
            r0 += rows;
        }
        for token_out in p.out.chunks_mut(p.rows) {
            let mut rest = token_out;
            for c in first..chunks.len() {
                // A chunk ends where the next one of this product starts, the last at its end.
                let end = chunks.get(c + 1).map_or(p.rows, |next| next.1);
                let (part, after) = rest.split_at_mut(end - chunks[c].1);
                chunks[c].2.push(part);
                rest = after;
            }
        }
    }
    chunks
}

/// Counts a chunk as done when dropped, so a panicking chunk is counted too (the caller's wait
/// in [`run_with_caller`] ends, and the scope then passes the panic on).
struct ChunkDone<'a>(&'a AtomicUsize);

impl Drop for ChunkDone<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Runs the chunks of a call in order: the calling thread starts on them at once and
/// `threads - 1` workers of the pool join in as they wake, each taking the next chunk left.
///
/// From an ordinary thread, handing all chunks to the pool instead (`install`) leaves the
/// caller asleep until they are done and costs a thread wake-up each way, a large share of a
/// call of a GEMV's size. Inside the pool this replaces a rayon `par_iter` over equal chunks,
/// whose splitting takes the chunks out of order, so the shrinking chunks of [`guided_chunks`]
/// would not come last, and threads sat idle at the ends of calls (`docs/measurements.md`).
fn run_with_caller<F>(pool: &rayon::ThreadPool, threads: usize, chunks: Vec<RowChunk<'_>>, f: &F)
where
    F: Fn(usize, usize, &mut [&mut [f32]]) + Sync,
{
    let n = chunks.len();
    let chunks: Vec<Mutex<RowChunk<'_>>> = chunks.into_iter().map(Mutex::new).collect();
    let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(chunk) = chunks.get(i) else { break };
        let _done = ChunkDone(&done);
        // Each chunk is taken once (the counter), so its lock is never contended.
        let mut chunk = chunk.lock().unwrap_or_else(|e| e.into_inner());
        let (m, r0, outs) = &mut *chunk;
        f(*m, *r0, outs);
    };
    pool.in_place_scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| work());
        }
        work();
        // The last chunks may still run on workers: wait for them spinning, as a blocking wait
        // would cost one more wake-up. A worker that had not started yet finds nothing left.
        while done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
    });
}

/// Checks the shapes of a product and panics with a message naming them (a programmer error).
pub(crate) fn assert_product_shapes(
    w: TernaryView<'_>,
    x_len: usize,
    tokens: usize,
    out_len: usize,
) {
    assert_eq!(
        x_len,
        tokens * w.cols(),
        "activations hold {x_len} values, expected [tokens={tokens}, cols={}]",
        w.cols()
    );
    assert_eq!(
        out_len,
        tokens * w.rows(),
        "output holds {out_len} values, expected [tokens={tokens}, rows={}]",
        w.rows()
    );
}

/// W1.58A8 product `out[t, r] = (Σ_k W[r, k] · q[t, k]) · gamma / s_t` with the default kernel
/// and thread count; bit-identical to [`reference::gemm_i8`].
///
/// `w` is a [`&PackedTernary`](crate::PackedTernary) or a [`TernaryView`].
///
/// # Shapes
/// - `x`: `[tokens, cols]` codes with `tokens` scales
/// - `out`: `[tokens, rows]`, row-major
///
/// # Panics
/// On mismatched shapes (a programmer error).
pub fn gemm_i8<'a>(w: impl Into<TernaryView<'a>>, x: &QuantizedActivations, out: &mut [f32]) {
    gemm_i8_with(w, x, out, CpuOptions::default())
        .expect("the global kernel choice was checked by set_kernel_choice");
}

/// [`gemm_i8`] with per-call [`CpuOptions`].
///
/// # Errors
/// [`KernelError::KernelUnavailable`] if the options force a kernel this CPU cannot run.
///
/// # Panics
/// On mismatched shapes (a programmer error).
pub fn gemm_i8_with<'a>(
    w: impl Into<TernaryView<'a>>,
    x: &QuantizedActivations,
    out: &mut [f32],
    options: CpuOptions,
) -> Result<(), KernelError> {
    gemm_i8_many_with(&[w.into()], x, &mut [out], options)
}

/// W1.58A8 products of several matrices with the same activations: `outs[m] = x Wₘᵀ`, each
/// bit-identical to [`gemm_i8_with`] of that matrix.
///
/// One call instead of one per matrix pads the activations and sums them once, and splits the
/// rows of all matrices over the threads in one parallel region. A decoder uses it for the
/// projections that read the same input (Q, K, V and the gate; SwiGLU's gate and up).
///
/// # Shapes
/// - every `ws[m]`: `[rows_m, cols]` (the same `cols`)
/// - `x`: `[tokens, cols]` codes with `tokens` scales
/// - `outs[m]`: `[tokens, rows_m]`, row-major
///
/// # Errors
/// [`KernelError::KernelUnavailable`] if the options force a kernel this CPU cannot run.
///
/// # Panics
/// On mismatched shapes or a different number of matrices and outputs (a programmer error).
pub fn gemm_i8_many_with(
    ws: &[TernaryView<'_>],
    x: &QuantizedActivations,
    outs: &mut [&mut [f32]],
    options: CpuOptions,
) -> Result<(), KernelError> {
    assert_eq!(
        ws.len(),
        outs.len(),
        "one output per matrix: {} matrices, {} outputs",
        ws.len(),
        outs.len()
    );
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert_product_shapes(*w, x.values.len(), x.tokens, out.len());
    }
    assert_eq!(x.scales.len(), x.tokens, "one activation scale per token");
    let kernel = options.kernel.unwrap_or_else(kernel_choice).resolve()?;
    let threads = options.threads.unwrap_or_else(num_threads).max(1);
    let Some(first) = ws.first() else {
        return Ok(());
    };
    let (tokens, cols, bpr) = (x.tokens, first.cols(), first.blocks_per_row());
    // `[matrices][tokens]`: each matrix has its own weight scale.
    let factors: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| x.scales.iter().map(|&s| i8_factor(w.scale(), s)).collect())
        .collect();
    let products = ws
        .iter()
        .zip(outs.iter_mut())
        .map(|(w, out)| ChunkedProduct {
            rows: w.rows(),
            bpr,
            out,
        })
        .collect();

    match kernel {
        #[cfg(target_arch = "x86_64")]
        KernelChoice::Avx2 => {
            let kp = bpr * QK_TERNARY;
            let xp = pad_rows(&x.values, tokens, cols, kp);
            let sums: Vec<i32> = (0..tokens)
                // SAFETY: `resolve` returned Avx2, so the CPU has AVX2.
                .map(|t| unsafe { avx2::sum_i8(x.row(t)) })
                .collect();
            let inputs: Vec<avx2::I8Inputs<'_>> = factors
                .iter()
                .map(|factors| avx2::I8Inputs {
                    x: &xp,
                    kp,
                    sums: &sums,
                    factors,
                })
                .collect();
            for_row_chunks(products, tokens, threads, |m, r0, outs| {
                // SAFETY: `resolve` returned Avx2, so the CPU has AVX2; `xp` holds `tokens` rows
                // of `kp` codes; the chunk's rows lie inside matrix `m`.
                unsafe { avx2::gemm_i8_rows(ws[m], &inputs[m], r0, outs) }
            });
        }
        _ => {
            for_row_chunks(products, tokens, threads, |m, r0, outs| {
                for (t, o) in outs.iter_mut().enumerate() {
                    for (i, y) in o.iter_mut().enumerate() {
                        let acc = reference::dot_i8(ws[m].row_blocks(r0 + i), x.row(t));
                        *y = finish_i8(acc, factors[m][t]);
                    }
                }
            });
        }
    }
    Ok(())
}

/// W1.58A16 product `out[t, r] = (Σ_k W[r, k] · x[t, k]) · gamma` with the default kernel and
/// thread count. Agrees with [`reference::gemm_f32`] up to float rounding (the sum order
/// differs).
///
/// # Shapes
/// - `x`: `[tokens, cols]`, row-major
/// - `out`: `[tokens, rows]`, row-major
///
/// # Panics
/// On mismatched shapes (a programmer error).
pub fn gemm_f32<'a>(w: impl Into<TernaryView<'a>>, x: &[f32], tokens: usize, out: &mut [f32]) {
    gemm_f32_with(w, x, tokens, out, CpuOptions::default())
        .expect("the global kernel choice was checked by set_kernel_choice");
}

/// [`gemm_f32`] with per-call [`CpuOptions`].
///
/// # Errors
/// [`KernelError::KernelUnavailable`] if the options force a kernel this CPU cannot run.
///
/// # Panics
/// On mismatched shapes (a programmer error).
pub fn gemm_f32_with<'a>(
    w: impl Into<TernaryView<'a>>,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    options: CpuOptions,
) -> Result<(), KernelError> {
    let w = w.into();
    assert_product_shapes(w, x.len(), tokens, out.len());
    let kernel = options.kernel.unwrap_or_else(kernel_choice).resolve()?;
    let threads = options.threads.unwrap_or_else(num_threads).max(1);
    let cols = w.cols();
    let bpr = w.blocks_per_row();
    let product = vec![ChunkedProduct {
        rows: w.rows(),
        bpr,
        out,
    }];

    match kernel {
        #[cfg(target_arch = "x86_64")]
        KernelChoice::Avx2 => {
            let kp = bpr * QK_TERNARY;
            let xp = pad_rows(x, tokens, cols, kp);
            for_row_chunks(product, tokens, threads, |_, r0, outs| {
                // SAFETY: `resolve` returned Avx2, so the CPU has AVX2 and FMA; `xp` holds
                // `tokens` rows of `kp` floats; the chunk's rows lie inside the matrix.
                unsafe { avx2::gemm_f32_rows(w, &xp, kp, r0, outs) }
            });
        }
        _ => {
            for_row_chunks(product, tokens, threads, |_, r0, outs| {
                for (t, o) in outs.iter_mut().enumerate() {
                    let xs = &x[t * cols..(t + 1) * cols];
                    for (i, y) in o.iter_mut().enumerate() {
                        *y = finish_f32(reference::dot_f32(w.row_blocks(r0 + i), xs), w.scale());
                    }
                }
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three products of 64 rows (one block each) and two tokens: every output written once
    /// with its matrix, row and token, whatever thread runs its chunk.
    fn fill_all(threads: usize) -> Vec<Vec<f32>> {
        let mut outs = vec![vec![-1.0f32; 2 * 64]; 3];
        let products = outs
            .iter_mut()
            .map(|out| ChunkedProduct {
                rows: 64,
                bpr: MIN_PARALLEL_WORK,
                out,
            })
            .collect();
        for_row_chunks(products, 2, threads, |m, r0, outs| {
            for (t, o) in outs.iter_mut().enumerate() {
                for (i, y) in o.iter_mut().enumerate() {
                    assert_eq!(*y, -1.0, "an output written twice");
                    *y = (m * 1000 + t * 100 + r0 + i) as f32;
                }
            }
        });
        outs
    }

    #[test]
    fn row_chunks_cover_every_output_once_from_any_thread() {
        let expected: Vec<Vec<f32>> = (0..3)
            .map(|m| {
                (0..2)
                    .flat_map(|t| (0..64).map(move |r| (m * 1000 + t * 100 + r) as f32))
                    .collect()
            })
            .collect();
        for threads in [1, 2, 3] {
            assert_eq!(
                fill_all(threads),
                expected,
                "{threads} threads, ordinary thread"
            );
            let in_pool = install(threads, || fill_all(threads));
            assert_eq!(in_pool, expected, "{threads} threads, inside the pool");
        }
    }

    /// Chunks of three products of different widths: every row of every token once, in
    /// order, in multiples of 4 rows but for a product's last; large first, the tail small.
    #[test]
    fn guided_chunks_shrink_and_cover_every_row_once() {
        let (tokens, threads) = (2, 2);
        let shapes = [(100, 3), (37, 5), (64, 2)];
        let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(r, _)| vec![0.0; r * tokens]).collect();
        let products = outs
            .iter_mut()
            .zip(shapes)
            .map(|(out, (rows, bpr))| ChunkedProduct { rows, bpr, out })
            .collect();
        let work: usize = shapes.iter().map(|(r, b)| r * b).sum::<usize>() * tokens;
        let tail = work / 16;
        let chunks = guided_chunks(products, tokens, threads, work, tail);
        let works: Vec<usize> = chunks
            .iter()
            .map(|(m, _, o)| o[0].len() * shapes[*m].1 * tokens)
            .collect();
        assert!(works[0] >= work / 4, "first chunk {works:?}");
        assert!(
            works
                .iter()
                .rev()
                .take(2)
                .all(|&w| w <= tail + 4 * 5 * tokens),
            "tail {works:?}"
        );
        let mut next_row = [0; 3];
        for (m, r0, mut o) in chunks {
            assert_eq!(r0, next_row[m], "chunks of product {m} out of order");
            let rows = o[0].len();
            next_row[m] += rows;
            assert!(
                rows % 4 == 0 || next_row[m] == shapes[m].0,
                "{rows} rows at {r0}"
            );
            assert_eq!(o.len(), tokens);
            for (t, part) in o.iter_mut().enumerate() {
                assert_eq!(part.len(), rows);
                for (i, y) in part.iter_mut().enumerate() {
                    *y += (1000 * t + r0 + i) as f32;
                }
            }
        }
        for (m, out) in outs.iter().enumerate() {
            let rows = shapes[m].0;
            let want: Vec<f32> = (0..tokens)
                .flat_map(|t| (0..rows).map(move |r| (1000 * t + r) as f32))
                .collect();
            assert_eq!(out, &want, "product {m}");
        }
    }

    #[test]
    fn a_panicking_chunk_panics_the_caller_instead_of_hanging() {
        for threads in [2, 3] {
            let result = std::panic::catch_unwind(|| {
                let mut out = vec![0.0f32; 64];
                let products = vec![ChunkedProduct {
                    rows: 64,
                    bpr: MIN_PARALLEL_WORK,
                    out: &mut out,
                }];
                for_row_chunks(products, 1, threads, |_, r0, _| {
                    assert!(r0 < 32, "chunk at row {r0}");
                });
            });
            assert!(result.is_err(), "{threads} threads");
        }
    }
}
