"""bit_ttt: ternary (BitNet b1.58) language models with Test-Time-Training layers.

Load a model trained or exported by the `bit-ttt-train` command line, get logits as numpy
arrays, generate or stream text, and keep what the model has read (its TTT state) in `.soul`
files. Computations release the GIL; errors are Python exceptions with the engine's message.
"""

from os import PathLike
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

Ids = Union[npt.NDArray[np.integer], Sequence[int], Sequence[Sequence[int]]]
Path = Union[str, PathLike]

class Tokenizer:
    """A byte-level BPE tokenizer (the tokenizer.json the command line writes)."""

    @staticmethod
    def load(path: Path) -> "Tokenizer":
        """Loads a tokenizer.json (FileNotFoundError, ValueError for a bad file)."""
    def encode(self, text: str) -> npt.NDArray[np.uint32]:
        """The ids of `text` (a uint32 array, which `forward` reads without a copy)."""
    def decode(self, ids: Ids) -> str:
        """The text of `ids` (ValueError for an id out of range)."""
    @property
    def vocab_size(self) -> int: ...
    @property
    def end_of_text(self) -> Optional[int]: ...

class State:
    """What a model has read of one sequence: its TTT fast weights (or KV cache)."""

    @property
    def position(self) -> int:
        """Tokens read so far."""
    def save(self, path: Path) -> None:
        """Writes the state to a .soul file (atomically)."""
    @staticmethod
    def load(path: Path, model: "BitLlama") -> "State":
        """Restores a state of `model` from a .soul file."""
    def copy(self) -> "State":
        """An independent copy."""

class Stream(Iterator[str]):
    """Text pieces of a generation, as they are made."""

    def __iter__(self) -> "Stream": ...
    def __next__(self) -> str: ...
    @property
    def tokens_generated(self) -> int: ...

class BitLlama:
    """A bit-ttt model: a model directory or a packed file (memory-mapped)."""

    @staticmethod
    def load(
        path: Path,
        device: Literal["cpu", "wgpu", "cuda"] = "cpu",
        n_gpu_layers: Union[int, Literal["auto"], None] = None,
        gpu_memory: Optional[int] = None,
        context: int = 4096,
        threads: int = 0,
        tokenizer: Optional[Path] = None,
    ) -> "BitLlama":
        """Opens a model; `n_gpu_layers` splits it between the GPU device and the CPU."""
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def device(self) -> Literal["cpu", "wgpu", "cuda"]: ...
    @property
    def engine(self) -> Literal["fused", "burn", "hybrid"]: ...
    @property
    def tokenizer(self) -> Optional[Tokenizer]: ...
    def forward(self, ids: Ids) -> npt.NDArray[np.float32]:
        """Logits at every position: ids [batch, seq] -> [batch, seq, vocab] (or [seq] -> [seq, vocab])."""
    def new_state(self) -> State: ...
    def read(self, ids: Ids, state: State) -> npt.NDArray[np.float32]:
        """Reads 1-D `ids` after what `state` has read; the logits of the next token, [vocab]."""
    def load_state(self, path: Path) -> State: ...
    def generate(
        self,
        prompt: Union[str, Ids],
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        state: Optional[State] = None,
    ) -> str:
        """The continuation of `prompt` (without it)."""
    def stream(
        self,
        prompt: Union[str, Ids],
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        state: Optional[State] = None,
    ) -> Stream:
        """As `generate`, but an iterator of text pieces."""

def train(**flags: Any) -> None:
    """Trains (or resumes) a model as `bit-ttt-train train` does, with its flags as keywords
    (underscores for dashes, True for a bare flag, a list for several values):
    `train(out="runs/x", data=["book.txt"], steps=500)`. Ctrl-C stops after the current step
    with a checkpoint (resume with `resume=True`) and raises KeyboardInterrupt."""
