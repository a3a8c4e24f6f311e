//! The Python module `bit_ttt`: [`engine`](crate::engine) behind PyO3 classes. Arguments are
//! converted and checked here, the GIL is released around every model computation, and
//! every error becomes a Python exception carrying the Rust message.

use std::ops::DerefMut;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bit_ttt_burn::hybrid::GpuLayers;
use bit_ttt_burn::{BitTttError, GenerationConfig, SamplingConfig};
use bit_ttt_train::commands::{self, Exit, StopOn};
use bit_ttt_train::device::{DeviceKind, FREE_MEMORY_SHARE};
use bit_ttt_train::tokenizer::Tokenizer;
use bit_ttt_train::TrainError;
use numpy::{
    PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::engine::{EngineError, Model, OpenOptions, State, TextGeneration};

/// The module.
#[pymodule]
#[pyo3(name = "bit_ttt")]
fn bit_ttt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBitLlama>()?;
    m.add_class::<PyState>()?;
    m.add_class::<PyStream>()?;
    m.add_class::<PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

/// An [`EngineError`] as the Python exception of its kind.
fn to_py(e: EngineError) -> PyErr {
    let message = e.to_string();
    let model_kind = |m: &BitTttError| match m {
        BitTttError::MissingFile(_) | BitTttError::NotAModel(_) => {
            PyFileNotFoundError::new_err(message.clone())
        }
        BitTttError::Io { .. } => PyOSError::new_err(message.clone()),
        BitTttError::NonFinite(_) | BitTttError::Data(_) | BitTttError::Kernel(_) => {
            PyRuntimeError::new_err(message.clone())
        }
        // Bad input, bad files (corrupt, of another shape), foreign states.
        _ => PyValueError::new_err(message.clone()),
    };
    match &e {
        EngineError::InvalidInput(_) => PyValueError::new_err(message),
        EngineError::Model(m) | EngineError::Train(TrainError::Model(m)) => model_kind(m),
        EngineError::Train(TrainError::MissingFile(_) | TrainError::MissingTokenizer(_)) => {
            PyFileNotFoundError::new_err(message)
        }
        EngineError::Train(TrainError::Io { .. }) => PyOSError::new_err(message),
        EngineError::Train(TrainError::Tokenizer(_) | TrainError::InvalidSetting(_)) => {
            PyValueError::new_err(message)
        }
        EngineError::Train(_) => PyRuntimeError::new_err(message),
    }
}

fn invalid(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

/// Token ids handed over from Python: borrowed in place when they are a C-contiguous `uint32`
/// array, else converted (each checked to be a valid id value).
enum Ids<'py> {
    Borrowed(PyReadonlyArrayDyn<'py, u32>),
    Owned(Vec<u32>),
}

impl Ids<'_> {
    fn as_slice(&self) -> &[u32] {
        match self {
            // Checked contiguous when made.
            Ids::Borrowed(a) => a.as_slice().unwrap_or(&[]),
            Ids::Owned(v) => v,
        }
    }
}

/// `obj` (a numpy integer array, or anything `numpy.asarray` turns into one: a list, a list
/// of lists) as ids and their shape.
fn ids_from<'py>(obj: &Bound<'py, PyAny>) -> PyResult<(Ids<'py>, Vec<usize>)> {
    let array = match obj.cast::<PyUntypedArray>() {
        Ok(a) => a.clone(),
        Err(_) => {
            let numpy = obj.py().import("numpy")?;
            numpy
                .call_method1("asarray", (obj,))?
                .cast_into::<PyUntypedArray>()
                .map_err(|_| invalid("ids must be an integer numpy array or a list of ints"))?
        }
    };
    let shape = array.shape().to_vec();
    if let Ok(a) = array.cast::<PyArrayDyn<u32>>() {
        let ro = a.readonly();
        if ro.as_slice().is_ok() {
            return Ok((Ids::Borrowed(ro), shape));
        }
        return Ok((Ids::Owned(ro.as_array().iter().copied().collect()), shape));
    }
    macro_rules! convert {
        ($($t:ty),*) => {$(
            if let Ok(a) = array.cast::<PyArrayDyn<$t>>() {
                let ro = a.readonly();
                let mut ids = Vec::with_capacity(ro.len());
                for (index, &v) in ro.as_array().iter().enumerate() {
                    ids.push(u32::try_from(v).map_err(|_| {
                        invalid(format!("id {v} at index {index} is not a token id (0 to 2^32-1)"))
                    })?);
                }
                return Ok((Ids::Owned(ids), shape));
            }
        )*};
    }
    convert!(i64, i32, u64, i16, u16, i8, u8);
    Err(invalid(format!(
        "ids must be integers, not {}",
        array.dtype().str()?
    )))
}

/// Ids of one sequence: a 1-D array or list.
fn sequence_from<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Ids<'py>> {
    let (ids, shape) = ids_from(obj)?;
    if shape.len() != 1 {
        return Err(invalid(format!(
            "ids of one sequence must be 1-D, not of shape {shape:?}"
        )));
    }
    Ok(ids)
}

/// A `device=` name.
fn device_from(name: &str) -> PyResult<DeviceKind> {
    match name {
        "cpu" | "ndarray" => Ok(DeviceKind::Ndarray),
        "wgpu" => Ok(DeviceKind::Wgpu),
        "cuda" => Ok(DeviceKind::Cuda),
        other => Err(invalid(format!(
            "unknown device {other:?}: expected \"cpu\", \"wgpu\" or \"cuda\""
        ))),
    }
}

/// `n_gpu_layers=` (an int or `"auto"`) and `gpu_memory=` (bytes) as a split.
fn split_from(
    n_gpu_layers: Option<&Bound<'_, PyAny>>,
    gpu_memory: Option<u64>,
    device: DeviceKind,
) -> PyResult<Option<GpuLayers>> {
    let Some(n) = n_gpu_layers else {
        if gpu_memory.is_some() {
            return Err(invalid(
                "gpu_memory only applies with n_gpu_layers=\"auto\"",
            ));
        }
        return Ok(None);
    };
    if let Ok(count) = n.extract::<usize>() {
        if gpu_memory.is_some() {
            return Err(invalid(
                "gpu_memory only applies with n_gpu_layers=\"auto\"",
            ));
        }
        return Ok(Some(GpuLayers::Count(count)));
    }
    match n.extract::<String>().as_deref() {
        Ok("auto") => {
            let budget_bytes = match gpu_memory {
                Some(b) => b,
                None => {
                    let free = device.free_memory().map_err(|e| to_py(e.into()))?;
                    (free as f64 * FREE_MEMORY_SHARE) as u64
                }
            };
            Ok(Some(GpuLayers::Auto { budget_bytes }))
        }
        _ => Err(invalid(
            "n_gpu_layers must be a number of blocks (an int >= 0) or \"auto\"",
        )),
    }
}

/// Sampling settings as the command line takes them: `top_k=0` and `top_p=1` mean no cut.
fn generation_config(
    max_new_tokens: usize,
    temperature: f64,
    top_k: usize,
    top_p: f64,
    seed: u64,
    stop_tokens: Vec<u32>,
) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        sampling: SamplingConfig {
            temperature,
            top_k: (top_k > 0).then_some(top_k),
            top_p: (top_p != 1.0).then_some(top_p),
            seed,
        },
        stop_tokens,
    }
}

/// A bit-ttt model: a model directory (`config.json`, `model.safetensors`) or a packed file
/// (`model.packed.safetensors`, memory-mapped), with its tokenizer if one lies next to it.
#[pyclass(name = "BitLlama", module = "bit_ttt", frozen)]
struct PyBitLlama {
    model: Model,
}

#[pymethods]
impl PyBitLlama {
    /// Opens a model. `device`: "cpu" (the fused CPU decoder), "wgpu" or "cuda" (when
    /// compiled in). `n_gpu_layers`: run the first N blocks on the GPU device and the rest on
    /// the CPU (an int, or "auto" for as many as fit `gpu_memory` bytes, by default 90% of
    /// the free memory CUDA reports). `threads`: CPU decoder threads (0: all cores).
    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu", n_gpu_layers = None, gpu_memory = None, context = 4096, threads = 0, tokenizer = None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        n_gpu_layers: Option<&Bound<'_, PyAny>>,
        gpu_memory: Option<u64>,
        context: usize,
        threads: usize,
        tokenizer: Option<PathBuf>,
    ) -> PyResult<Self> {
        let device = device_from(device)?;
        let options = OpenOptions {
            device,
            n_gpu_layers: split_from(n_gpu_layers, gpu_memory, device)?,
            context,
            threads,
            tokenizer,
        };
        let model = py.detach(|| Model::open(&path, &options)).map_err(to_py)?;
        Ok(Self { model })
    }

    /// The model's config as a dict (as in its `config.json`).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = serde_json::to_string(self.model.config())
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        py.import("json")?.call_method1("loads", (json,))
    }

    /// The vocabulary size: ids must be below it.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    /// "cpu", "wgpu" or "cuda".
    #[getter]
    fn device(&self) -> &'static str {
        match self.model.device() {
            DeviceKind::Ndarray => "cpu",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// "fused" (the CPU decoder), "burn" (Burn's ops on a GPU) or "hybrid" (a GPU/CPU split).
    #[getter]
    fn engine(&self) -> &'static str {
        self.model.engine()
    }

    /// The model's tokenizer, or None.
    #[getter]
    fn tokenizer(&self) -> Option<PyTokenizer> {
        self.model.tokenizer().map(|t| PyTokenizer {
            tokenizer: t.clone(),
        })
    }

    /// Logits at every position: `ids` of shape `[batch, seq]` (or `[seq]`), each row read
    /// from no context; returns float32 `[batch, seq, vocab]` (or `[seq, vocab]`). A
    /// C-contiguous uint32 array is read in place; other integer arrays and lists are
    /// converted.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ids, shape) = ids_from(ids)?;
        let (batch, seq) = match shape[..] {
            [seq] => (1, seq),
            [batch, seq] => (batch, seq),
            _ => {
                return Err(invalid(format!(
                    "ids must be of shape [batch, seq] or [seq], not {shape:?}"
                )))
            }
        };
        let slice = ids.as_slice();
        let logits = py
            .detach(|| self.model.forward(slice, batch, seq))
            .map_err(to_py)?;
        let vocab = self.model.vocab_size();
        let out = PyArray1::from_vec(py, logits);
        let out = if shape.len() == 1 {
            out.reshape([seq, vocab])?.into_any()
        } else {
            out.reshape([batch, seq, vocab])?.into_any()
        };
        Ok(out)
    }

    /// A state before any token, for `read` and `generate(state=...)`.
    fn new_state(slf: Py<Self>, py: Python<'_>) -> PyState {
        let state = slf.get().model.new_state();
        PyState {
            model: slf.clone_ref(py),
            state,
        }
    }

    /// Reads `ids` (1-D) after everything `state` has read; returns the float32 logits of
    /// the next token, `[vocab]`.
    fn read<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        mut state: PyRefMut<'py, PyState>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let ids = sequence_from(ids)?;
        let slice = ids.as_slice();
        let state = &mut state.deref_mut().state;
        let logits = py.detach(|| self.model.read(slice, state)).map_err(to_py)?;
        Ok(PyArray1::from_vec(py, logits))
    }

    /// Restores a state saved with `State.save` for this model.
    fn load_state(slf: Py<Self>, py: Python<'_>, path: PathBuf) -> PyResult<PyState> {
        let model = slf.get();
        let state = py.detach(|| model.model.load_state(&path)).map_err(to_py)?;
        Ok(PyState {
            model: slf.clone_ref(py),
            state,
        })
    }

    /// Generates a continuation of `prompt` (a str, or ids) and returns its text (without the
    /// prompt). Defaults as the command line's `generate`; `top_k=0` and `top_p=1` turn the
    /// cuts off, `temperature=0` is greedy. Ends at the end-of-text token, after
    /// `max_new_tokens`, or before the first of the `stop` strings. With `state`, continues
    /// what it has read (and leaves it having read the prompt and the text). Ctrl-C stops it
    /// with KeyboardInterrupt.
    #[pyo3(signature = (prompt, max_new_tokens = 200, temperature = 0.8, top_k = 40, top_p = 0.95, seed = 0, stop = None, state = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        slf: Py<Self>,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: usize,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        seed: u64,
        stop: Option<Vec<String>>,
        state: Option<Py<PyState>>,
    ) -> PyResult<String> {
        let mut stream = Self::stream(
            slf,
            py,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            state,
        )?;
        let model = stream.model.clone_ref(py);
        let model = &model.get().model;
        let state_ref = stream.state.clone_ref(py);
        let mut state = state_ref.borrow_mut(py);
        let state = &mut state.deref_mut().state;
        let generation = &mut stream.generation;
        py.detach(|| {
            let mut text = String::new();
            while let Some(piece) = generation.next_piece(model, state).map_err(to_py)? {
                text.push_str(&piece);
                // Ctrl-C reaches Python's handler, which only sets a flag: look at it.
                Python::attach(|py| py.check_signals())?;
            }
            Ok(text)
        })
    }

    /// As `generate`, but an iterator of the text pieces as they are generated.
    #[pyo3(signature = (prompt, max_new_tokens = 200, temperature = 0.8, top_k = 40, top_p = 0.95, seed = 0, stop = None, state = None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        slf: Py<Self>,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: usize,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        seed: u64,
        stop: Option<Vec<String>>,
        state: Option<Py<PyState>>,
    ) -> PyResult<PyStream> {
        let model = &slf.get().model;
        let tokenizer = model.require_tokenizer().map_err(to_py)?;
        let ids = match prompt.cast::<PyString>() {
            Ok(text) => {
                let text = text.to_str()?;
                let ids = tokenizer.encode(text).map_err(|e| to_py(e.into()))?;
                if ids.is_empty() {
                    return Err(invalid("the prompt is empty"));
                }
                Ids::Owned(ids)
            }
            Err(_) => sequence_from(prompt)?,
        };
        let state = match state {
            Some(s) => {
                if !s.borrow(py).model.is(&slf) {
                    return Err(invalid("this state belongs to another model"));
                }
                s
            }
            None => Py::new(py, Self::new_state(slf.clone_ref(py), py))?,
        };
        let config = generation_config(
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            tokenizer.end_of_text().into_iter().collect(),
        );
        let generation = {
            let mut state_ref = state.borrow_mut(py);
            let inner = &mut state_ref.deref_mut().state;
            let slice = ids.as_slice();
            py.detach(|| {
                TextGeneration::start(model, inner, slice, config, stop.unwrap_or_default())
            })
            .map_err(to_py)?
        };
        Ok(PyStream {
            model: slf.clone_ref(py),
            state,
            generation,
        })
    }

    fn __repr__(&self) -> String {
        let c = self.model.config();
        format!(
            "BitLlama({} blocks of {}, d_model {}, vocab {}, on {}, engine {})",
            c.n_layers,
            c.mixer.name(),
            c.d_model,
            c.vocab_size,
            self.device(),
            self.model.engine()
        )
    }
}

/// What a model has read of one sequence: its TTT fast weights (or KV cache). Save it with
/// `save`, restore it with `State.load(path, model)` or `model.load_state(path)`.
#[pyclass(name = "State", module = "bit_ttt")]
struct PyState {
    model: Py<PyBitLlama>,
    state: State,
}

#[pymethods]
impl PyState {
    /// Tokens read so far.
    #[getter]
    fn position(&self) -> usize {
        self.state.position()
    }

    /// Writes the state to a `.soul` file (atomically).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let model = &self.model.get().model;
        let state = &self.state;
        py.detach(|| model.save_state(state, &path)).map_err(to_py)
    }

    /// Restores a state of `model` from a `.soul` file.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf, model: Py<PyBitLlama>) -> PyResult<Self> {
        PyBitLlama::load_state(model, py, path)
    }

    /// An independent copy (reading on with one leaves the other as it was).
    fn copy(&self, py: Python<'_>) -> Self {
        Self {
            model: self.model.clone_ref(py),
            state: self.state.clone(),
        }
    }

    fn __repr__(&self) -> String {
        format!("State(position={})", self.state.position())
    }
}

/// Text pieces of a generation, as they are made (from `BitLlama.stream`).
#[pyclass(name = "Stream", module = "bit_ttt")]
struct PyStream {
    model: Py<PyBitLlama>,
    state: Py<PyState>,
    generation: TextGeneration,
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(mut slf: PyRefMut<'_, Self>, py: Python<'_>) -> PyResult<Option<String>> {
        let this = slf.deref_mut();
        let model = this.model.clone_ref(py);
        let model = &model.get().model;
        let mut state = this.state.borrow_mut(py);
        let state = &mut state.deref_mut().state;
        let generation = &mut this.generation;
        py.detach(|| generation.next_piece(model, state))
            .map_err(to_py)
    }

    /// Tokens generated so far.
    #[getter]
    fn tokens_generated(&self) -> usize {
        self.generation.tokens_generated()
    }
}

/// A byte-level BPE tokenizer (the `tokenizer.json` the command line writes).
#[pyclass(name = "Tokenizer", module = "bit_ttt", frozen)]
struct PyTokenizer {
    tokenizer: Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    /// Loads a `tokenizer.json`.
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        let tokenizer = Tokenizer::load(&path).map_err(|e| to_py(e.into()))?;
        Ok(Self { tokenizer })
    }

    /// The ids of `text`, as a uint32 array (what `forward` reads in place).
    fn encode<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let ids = py
            .detach(|| self.tokenizer.encode(text))
            .map_err(|e| to_py(e.into()))?;
        Ok(PyArray1::from_vec(py, ids))
    }

    /// The text of `ids`.
    fn decode(&self, ids: &Bound<'_, PyAny>) -> PyResult<String> {
        let ids = sequence_from(ids)?;
        if let Some(&bad) = ids
            .as_slice()
            .iter()
            .find(|&&t| t as usize >= self.tokenizer.vocab_size())
        {
            return Err(invalid(format!(
                "id {bad} is out of range for a vocabulary of {}",
                self.tokenizer.vocab_size()
            )));
        }
        self.tokenizer
            .decode(ids.as_slice())
            .map_err(|e| to_py(e.into()))
    }

    /// The number of tokens.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    /// The end-of-text token's id, or None.
    #[getter]
    fn end_of_text(&self) -> Option<u32> {
        self.tokenizer.end_of_text()
    }
}

/// Trains (or resumes) a model exactly as `bit-ttt-train train` does, with the same arguments
/// as keywords: `train(out="runs/x", data=["book.txt"], steps=500, mixer="ttt_mlp")` is
/// `bit-ttt-train train --out runs/x --data book.txt --steps 500 --mixer ttt_mlp`
/// (underscores for dashes; `True` for a bare flag such as `resume=True`; a list for several
/// values). Progress goes to stderr. Ctrl-C stops after the current step with a checkpoint
/// (continue with `resume=True`) and raises KeyboardInterrupt.
#[pyfunction]
#[pyo3(signature = (**kwargs))]
fn train(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
    let argv = command_line("train", kwargs)?;
    let (cli, matches) = match commands::parse(&argv) {
        Ok(parsed) => parsed,
        Err(e) => {
            return match e.kind() {
                commands::ClapErrorKind::DisplayHelp | commands::ClapErrorKind::DisplayVersion => {
                    println!("{e}");
                    Ok(())
                }
                _ => Err(invalid(e.render().to_string().trim_end().to_string())),
            };
        }
    };
    // The trainer runs on its own thread, so that this one can look for Ctrl-C (Python's
    // handler only sets a flag the interpreter checks) and pass it on as the stop flag.
    let stop = Arc::new(AtomicBool::new(false));
    let trainer = {
        let stop = StopOn::Flag(stop.clone());
        std::thread::spawn(move || commands::execute(cli, &matches, &stop))
    };
    let mut interrupted = None;
    while !trainer.is_finished() {
        py.detach(|| std::thread::sleep(Duration::from_millis(50)));
        if let Err(e) = py.check_signals() {
            if interrupted.is_none() {
                eprintln!("\ninterrupted: stopping after this step and saving a checkpoint");
                stop.store(true, Ordering::SeqCst);
                interrupted = Some(e);
            }
        }
    }
    let outcome = trainer
        .join()
        .map_err(|_| PyRuntimeError::new_err("the trainer panicked"))?;
    match (outcome, interrupted) {
        (Ok(Exit::Ok), None) => Ok(()),
        (Ok(_), Some(e)) => Err(e),
        (Ok(Exit::Interrupted), None) => Err(PyKeyboardInterrupt::new_err(
            "training stopped after a checkpoint",
        )),
        (Err(e), _) => Err(command_error(&e)),
    }
}

/// `bit-ttt-train SUBCOMMAND` with `kwargs` as its flags.
fn command_line(subcommand: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<String>> {
    let mut argv = vec!["bit-ttt-train".to_string(), subcommand.to_string()];
    let Some(kwargs) = kwargs else {
        return Ok(argv);
    };
    for (key, value) in kwargs.iter() {
        let flag = format!("--{}", key.extract::<String>()?.replace('_', "-"));
        if value.is_none() {
            continue;
        }
        if let Ok(on) = value.cast::<pyo3::types::PyBool>() {
            if on.is_true() {
                argv.push(flag);
            }
            continue;
        }
        argv.push(flag);
        if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
            for item in value.try_iter()? {
                argv.push(item?.str()?.to_string());
            }
        } else {
            argv.push(value.str()?.to_string());
        }
    }
    Ok(argv)
}

/// A command's error as the Python exception of the typed error inside it, with the whole
/// message (its context included). The command line's own checks of its arguments carry no
/// typed error: they are `ValueError`s.
fn command_error(e: &anyhow::Error) -> PyErr {
    let message = format!("{e:#}");
    if let Some(model_error) = e.downcast_ref::<BitTttError>() {
        return match model_error {
            BitTttError::MissingFile(_) | BitTttError::NotAModel(_) => {
                PyFileNotFoundError::new_err(message)
            }
            BitTttError::Io { .. } => PyOSError::new_err(message),
            _ => PyRuntimeError::new_err(message),
        };
    }
    match e.downcast_ref::<TrainError>() {
        Some(
            TrainError::MissingFile(_)
            | TrainError::MissingTokenizer(_)
            | TrainError::NoTokenizerFor(_),
        ) => PyFileNotFoundError::new_err(message),
        Some(TrainError::Io { .. }) => PyOSError::new_err(message),
        Some(
            TrainError::Diverged { .. }
            | TrainError::RunLocked { .. }
            | TrainError::BadCheckpoint { .. }
            | TrainError::Distributed(_)
            | TrainError::Model(_),
        ) => PyRuntimeError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}
