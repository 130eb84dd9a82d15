"""dqfd.py's demonstration loader against crafted files: each must end in one sentence on stderr and a non-zero
exit within seconds, with no traceback, no code run and no huge allocation (issue 17, section 1).

CRAFTED below is the generator: one function per kind of file, writing it into a folder. The pickles are
assembled opcode by opcode, as an attacker would, so each file is exactly the forgery it names.
"""

import json
import os
import pickle
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

import dqfd
from helpers import ROOT, assert_one_line_error, run_script

CANARY = "canary"  # the file a payload that runs code would create in the working folder
TOUCH_CANARY = f"touch {CANARY}"


# --- Assembling pickles ------------------------------------------------------------------------

def text(value: str) -> bytes:
    return pickle.BINUNICODE + struct.pack("<I", len(value.encode())) + value.encode()


def raw(value: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(value)) + value


def integer(value: int) -> bytes:
    if -2**31 <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    size = (value.bit_length() + 8) // 8
    return pickle.LONG1 + bytes([size]) + value.to_bytes(size, "little", signed=True)


def name(module: str, attribute: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{attribute}\n".encode()


def tuple_of(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def call(function: bytes, *args: bytes) -> bytes:
    return function + tuple_of(*args) + pickle.REDUCE


def whole(body: bytes) -> bytes:
    return pickle.PROTO + b"\x03" + body + pickle.STOP


def dtype(code: str, flags: int = 63) -> bytes:
    """numpy's own pickle of a dtype; flags 63 is an object dtype's, 0 claims it holds no Python objects."""
    order = "|" if code in ("O8", "b1") else "<"
    return (call(name("numpy", "dtype"), text(code), pickle.NEWFALSE, pickle.NEWTRUE)
            + tuple_of(integer(3), text(order), pickle.NONE, pickle.NONE, pickle.NONE, integer(-1), integer(-1),
                       integer(flags)) + pickle.BUILD)


def array(shape: tuple, dtype_pickle: bytes, data: bytes) -> bytes:
    """numpy's own pickle of an array: _reconstruct, then BUILD with (version, shape, dtype, fortran, data)."""
    empty = call(name("numpy.core.multiarray", "_reconstruct"), name("numpy", "ndarray"), tuple_of(integer(0)), raw(b"b"))
    return empty + tuple_of(integer(1), tuple_of(*map(integer, shape)), dtype_pickle, pickle.NEWFALSE, data) + pickle.BUILD


def memo(index: int) -> bytes:
    return pickle.BINGET + bytes([index])


def object_array_start(shape: bytes, first: bool) -> bytes:
    """An object array's pickle up to its data: the first one memoizes _reconstruct, its arguments, the shape and
    dtype('O') as 0, 1, 2 and 3, as pickle does; later ones refer to them."""
    if first:
        return (name("numpy.core.multiarray", "_reconstruct") + pickle.MEMOIZE
                + tuple_of(name("numpy", "ndarray"), tuple_of(integer(0)), raw(b"b")) + pickle.MEMOIZE + pickle.REDUCE
                + pickle.MARK + integer(1) + shape + pickle.MEMOIZE + dtype("O8") + pickle.MEMOIZE + pickle.NEWFALSE)
    return memo(0) + memo(1) + pickle.REDUCE + pickle.MARK + integer(1) + memo(2) + memo(3) + pickle.NEWFALSE


def npy(path, body: bytes, descr: str = "|O", shape: tuple = (1,)) -> str:
    """A .npy file: numpy's header, then `body` (a pickle, or raw array bytes)."""
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": descr, "fortran_order": False, "shape": shape})
        file.write(body)
    return str(path)


def saved(path, value) -> str:
    np.save(path, value, allow_pickle=True)
    return str(path)


def object_array(items: list) -> np.ndarray:
    result = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        result[i] = item
    return result


def step(state, reward=1.0) -> list:
    return [np.asarray(state, dtype=np.float64), 1, reward, np.zeros(4), False]


# --- The generator: every kind of crafted file, and what its refusal must say -----------------------

def forged_object_dtype_through_frombuffer(folder):
    # _frombuffer(8 bytes, dtype('O') with its flags cleared, (1,), 'C'): numpy takes the bytes for a PyObject
    # pointer (a segfault); with the flags intact numpy refuses an object array from a buffer.
    return npy(folder / "frombuffer.npy", whole(call(name("numpy.core.numeric", "_frombuffer"), raw(b"A" * 8),
                                                     dtype("O8", flags=0), tuple_of(integer(1)), text("C"))))


def forged_dtype_flags(folder):
    # An object dtype whose BUILD clears its flags, then an array of it over 8 raw bytes: a segfault today.
    return npy(folder / "flags.npy", whole(array((1,), dtype("O8", flags=0), raw(b"A" * 8))))


def zero_stride_ndarray(folder):
    # numpy.ndarray((10**9,), 'f8', buffer=8 bytes, strides=(0,)): one number seen as 8 GB of them.
    return npy(folder / "strides.npy", whole(call(name("numpy", "ndarray"), tuple_of(integer(10**9)), text("f8"),
                                                  raw(bytes(8)), integer(0), tuple_of(integer(0)))))


def header_claims_a_huge_shape(folder):
    return npy(folder / "huge_header.npy", bytes(40), descr="<f8", shape=(10**12, 5))


def pickle_claims_a_huge_shape(folder):
    return npy(folder / "huge_pickle.npy", whole(array((10**12,), dtype("f8"), raw(bytes(8)))))


def a_shape_of_200_000_dimensions(folder):
    # the product of 200,000 twos is a 200,000-bit number, and computing it one factor at a time takes seconds
    return npy(folder / "dimensions.npy", whole(array((2,) * 200_000, dtype("f8"), raw(bytes(8)))))


def zero_width_rows(folder):
    return npy(folder / "zero_width.npy", b"", descr="<f8", shape=(10**15, 0))


def episodes_repeated_by_reference(folder):
    # pickle writes a repeated object once and then refers to it: 10^9 transitions in about 220 KB
    episode = [step(np.zeros(4))] * 10_000
    return saved(folder / "repeated.npy", object_array([episode] * 100_000))


def object_arrays_sharing_one_list(folder):
    # 10,000 arrays of 100,000 items each, all built from one memoized list (memo 4): 10^9 items from 300 KB.
    shared_list = pickle.EMPTY_LIST + pickle.MEMOIZE + pickle.MARK + pickle.NONE * 100_000 + pickle.APPENDS
    arrays = [object_array_start(tuple_of(integer(100_000)), first=True) + shared_list + pickle.TUPLE + pickle.BUILD]
    arrays += [object_array_start(b"", first=False) + memo(4) + pickle.TUPLE + pickle.BUILD] * 9_999
    body = pickle.EMPTY_LIST + pickle.MARK + b"".join(arrays) + pickle.APPENDS
    return npy(folder / "shared_list.npy", pickle.PROTO + b"\x04" + body + pickle.STOP)


def a_zero_in_the_middle_of_a_shape(folder):
    # An object array of shape (10^8, 0, 5) and no items: numpy expands it to 10^8 empty rows, which took the
    # first version of this loader minutes and gigabytes; a product with a zero in it must not hide the 10^8.
    body = object_array_start(tuple_of(integer(10**8), integer(0), integer(5)), first=True) + pickle.EMPTY_LIST
    return npy(folder / "zero_in_shape.npy", pickle.PROTO + b"\x04" + body + pickle.TUPLE + pickle.BUILD + pickle.STOP)


def bytearray_of_2_gb(folder):
    # 2 GB from a 160-byte file: bytearray(2 * 10**9), which the old loader's builtins allowed.
    return npy(folder / "bytearray.npy", whole(call(name("builtins", "bytearray"), integer(2 * 10**9))))


def length_claims_2_gb(folder):
    # BYTEARRAY8 says 2 GB follow; 8 bytes do.
    return npy(folder / "bytearray8.npy", pickle.PROTO + b"\x05" + b"\x96" + struct.pack("<Q", 2 * 10**9) + bytes(8))


def header_claims_4_gb(folder):
    path = folder / "header_length.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + b"{}")
    return str(path)


def larger_than_the_limit(folder):
    path = folder / "large.npy"
    with open(path, "wb") as file:
        file.truncate(dqfd.MAX_DEMO_BYTES + 1)  # sparse: no disk space used
    return str(path)


def lists_nested_deep(folder):
    # 20,000 lists, each inside the one before
    return npy(folder / "deep_lists.npy", whole(pickle.EMPTY_LIST * 20_000 + pickle.APPEND * 19_999))


def object_arrays_nested_deep(folder):
    # 100,000 object arrays of one item, each inside the one before: numpy frees its own recursively (a segfault at 20,000)
    starts = object_array_start(tuple_of(integer(1)), first=True) + pickle.EMPTY_LIST
    starts += (object_array_start(b"", first=False) + pickle.EMPTY_LIST) * 99_999
    body = starts + pickle.NONE + (pickle.APPEND + pickle.TUPLE + pickle.BUILD) * 100_000
    return npy(folder / "deep_arrays.npy", pickle.PROTO + b"\x04" + body + pickle.STOP)


def tuples_nested_deep_as_a_dtype(folder):
    # numpy.dtype(200,000 tuples, each inside the one before), then its BUILD: looking it up would hash it (a crash)
    deep_tuple = pickle.EMPTY_TUPLE + pickle.TUPLE1 * 200_000
    dtype_of_deep_tuple = call(name("numpy", "dtype"), deep_tuple, pickle.NEWFALSE, pickle.NEWTRUE)
    return npy(folder / "deep_tuples.npy", whole(dtype_of_deep_tuple + tuple_of(integer(3), text("<")) + pickle.BUILD))


def state_nested_deep(folder):
    # one episode of one step whose states are 20,000 lists, each inside the one before
    deep_list = pickle.EMPTY_LIST * 20_000 + pickle.APPEND * 19_999
    step_of_deep_states = (pickle.EMPTY_LIST + pickle.MARK + deep_list + integer(1) + integer(1) + deep_list
                           + pickle.NEWFALSE + pickle.APPENDS)
    return npy(folder / "deep_state.npy", whole(pickle.EMPTY_LIST * 2 + step_of_deep_states + pickle.APPEND * 2))


def header_nested_deep(folder):
    path = folder / "deep_header.npy"
    header = ("{'descr': '<f8', 'fortran_order': False, 'shape': (" + "-" * 5000 + "1,)}").encode()
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
    return str(path)


def a_fifo(folder):
    os.mkfifo(folder / "fifo.npy")
    return str(folder / "fifo.npy")


def a_socket(folder):
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(folder / "socket.npy"))  # the socket file stays after the socket closes
    return str(folder / "socket.npy")


def proc_self_mem(folder):
    return "/proc/self/mem"


def a_symlink_loop(folder):
    os.symlink(folder / "loop_b.npy", folder / "loop_a.npy")
    os.symlink(folder / "loop_a.npy", folder / "loop_b.npy")
    return str(folder / "loop_a.npy")


def a_name_too_long(folder):
    return str(folder / ("x" * 300 + ".npy"))


def a_path_through_a_file(folder):
    (folder / "plain.npy").write_bytes(b"")
    return str(folder / "plain.npy" / "demo.npy")


def a_directory(folder):
    (folder / "folder.npy").mkdir()
    return str(folder / "folder.npy")


def a_0d_array_as_an_episode(folder):
    return saved(folder / "0d_episode.npy", object_array([[step(np.zeros(4))], np.array(5.0)]))


def a_0d_array_as_a_step(folder):
    return saved(folder / "0d_step.npy", object_array([[step(np.zeros(4)), np.array(1.0)]]))


def a_0d_array_of_numbers(folder):
    return saved(folder / "0d_file.npy", np.array(3.0))


def a_state_as_an_object_array_of_a_huge_int(folder):
    # numpy would cast an object array's items itself: a str as a number, and a 2000-bit int fails with OverflowError
    state = object_array([0.0, 0.0, 0.0, 2**2000])
    return saved(folder / "huge_int.npy", object_array([[[state, 1, 1.0, np.zeros(4), False]]]))


def a_state_of_1e300(folder):
    return saved(folder / "state_1e300.npy", object_array([[step(np.zeros(4)), step([0, 1e300, 0, 0])]]))


def a_reward_of_1e300(folder):
    return saved(folder / "reward_1e300.npy", object_array([[step(np.zeros(4)), step(np.zeros(4), reward=1e300)]]))


def os_system(folder):
    return npy(folder / "system.npy", whole(call(name("os", "system"), text(TOUCH_CANARY))))


def builtins_eval(folder):
    return npy(folder / "eval.npy", whole(call(name("builtins", "eval"), text(f"__import__('os').system('{TOUCH_CANARY}')"))))


def inst_opcode(folder):
    # protocol 0's INST: imports and calls os.system without a REDUCE
    return npy(folder / "inst.npy", pickle.MARK + text(TOUCH_CANARY) + b"ios\nsystem\n" + pickle.STOP)


def stack_global_of_subprocess(folder):
    body = text("subprocess") + text("getoutput") + pickle.STACK_GLOBAL + tuple_of(text(TOUCH_CANARY)) + pickle.REDUCE
    return npy(folder / "stack_global.npy", pickle.PROTO + b"\x04" + body + pickle.STOP)


def a_name_with_line_breaks(folder):
    # STACK_GLOBAL takes any string: one with line breaks must not break the one-line refusal
    body = text("os\n\nimport") + text("system\n") + pickle.STACK_GLOBAL + tuple_of(text(TOUCH_CANARY)) + pickle.REDUCE
    return npy(folder / "line_breaks.npy", pickle.PROTO + b"\x04" + body + pickle.STOP)


def a_truncated_pickle(folder):
    whole_file = (ROOT / "demo_traj_2.npy").read_bytes()
    path = folder / "truncated.npy"
    path.write_bytes(whole_file[:len(whole_file) // 2])
    return str(path)


def a_deep_tuple_in_a_set(folder):
    # a set hashes its items: 200,000 tuples, each inside the one before, crash it (sets are no opcodes numpy writes)
    deep_tuple = pickle.EMPTY_TUPLE + pickle.TUPLE1 * 200_000
    return npy(folder / "deep_set.npy", pickle.PROTO + b"\x04" + pickle.EMPTY_SET + pickle.MARK + deep_tuple
               + pickle.ADDITEMS + pickle.STOP)


def a_memo_index_of_2_to_the_31(folder):
    # LONG_BINPUT 2^31: the unpickler would grow its memo to 2^32 entries (32 GB) and fill them
    return npy(folder / "memo.npy", whole(pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**31)))


def a_million_one_step_episodes_sharing_their_step(folder):
    # 10^6 references to one episode of one step (2 MB)
    return saved(folder / "million_shared.npy", object_array([[step(np.zeros(4))]] * 10**6))


def a_million_one_step_episodes(folder):
    # 10^6 episodes, each a step of its own sharing two state arrays (23 MB): the first loader read them all, 48 s
    # of CPU, before the replay buffer refused them; the header tells their number
    state = np.zeros(4)
    return saved(folder / "million.npy", object_array([[[state, 1, 1.0, state, False]] for _ in range(10**6)]))


def a_million_one_step_episodes_in_a_list(folder):
    # the same episodes in a plain list, which np.save writes as a 0-d object array: only the pickle tells their number
    state, episodes = np.zeros(4), np.empty((), dtype=object)
    episodes[()] = [[[state, 1, 1.0, state, False]] for _ in range(10**6)]
    return saved(folder / "million_list.npy", episodes)


# (kind, the words its one-sentence refusal must contain)
CRAFTED = [
    (forged_object_dtype_through_frombuffer, "truncated or corrupt"),
    (forged_dtype_flags, "truncated or corrupt"),
    (zero_stride_ndarray, "truncated or corrupt"),
    (header_claims_a_huge_shape, "its header claims more than the 100000 episodes or steps"),
    (pickle_claims_a_huge_shape, "truncated or corrupt"),
    (a_shape_of_200_000_dimensions, "truncated or corrupt"),
    (zero_width_rows, "it gives no transitions, or more than the 100000 episodes or steps"),
    (episodes_repeated_by_reference, "it gives no transitions, or more than the 100000 episodes"),
    (object_arrays_sharing_one_list, "its object arrays hold more than the 1000000 items"),
    (a_zero_in_the_middle_of_a_shape, "its object arrays hold more than the 1000000 items"),
    (bytearray_of_2_gb, "asks for builtins.bytearray"),
    (length_claims_2_gb, "truncated or corrupt"),
    (header_claims_4_gb, "not a .npy file"),
    (larger_than_the_limit, "is not a regular file of at most 67108864 bytes"),
    (lists_nested_deep, "episode 0, step 0 is not a [state, action, reward, next_state, done] step"),
    (object_arrays_nested_deep, "episode 0, step 0 is not a [state, action, reward, next_state, done] step"),
    (tuples_nested_deep_as_a_dtype, "deep_tuples.npy is not an array of episodes"),
    (state_nested_deep, "episode 0, step 0: the state is a list of length 1, not numbers of shape (4,)"),
    (header_nested_deep, "not a .npy file"),
    (a_fifo, "is not a regular file"),
    (a_socket, "is not a regular file"),
    (proc_self_mem, "not a .npy file"),
    (a_symlink_loop, "Too many levels of symbolic links"),
    (a_name_too_long, "File name too long"),
    (a_path_through_a_file, "Not a directory"),
    (a_directory, "is not a regular file"),
    (a_0d_array_as_an_episode, "episode 1 is not a sequence of steps"),
    (a_0d_array_as_a_step, "episode 0, step 1 is not a [state, action, reward, next_state, done] step"),
    (a_0d_array_of_numbers, "0d_file.npy is not an array of episodes"),
    (a_state_of_1e300, "episode 0, step 1: the state holds 1e+300, not a finite number"),
    (a_state_as_an_object_array_of_a_huge_int, "episode 0, step 0: the state holds inf, not a finite number"),
    (a_reward_of_1e300, "episode 0, step 1: the reward holds 1e+300, not a finite number"),
    (os_system, "asks for os.system"),
    (builtins_eval, "asks for builtins.eval"),
    (inst_opcode, "uses the opcode INST"),
    (stack_global_of_subprocess, "asks for subprocess.getoutput"),
    (a_name_with_line_breaks, "asks for os import.system, which could run code"),
    (a_truncated_pickle, "truncated or corrupt"),
    (a_deep_tuple_in_a_set, "uses the opcode EMPTY_SET"),
    (a_memo_index_of_2_to_the_31, "truncated or corrupt"),
    (a_million_one_step_episodes_sharing_their_step, "its header claims more than the 100000 episodes or steps"),
    (a_million_one_step_episodes, "its header claims more than the 100000 episodes or steps"),
    (a_million_one_step_episodes_in_a_list, "its pickle is longer than the 10000000 opcodes"),
]


# --- The tests -------------------------------------------------------------------------------------

TINY_RUN = ["--total-timesteps", "300", "--pretrain-steps", "10", "--eval-episodes", "1"]
# Each refusal's bound: most take well under one second; the deep ones and the million episodes in a plain list (10^7
# opcodes walked before the refusal) take 3 to 5 s, and 10.5 s were seen with a third process on the two cores. The
# reader before the counts spent 43 s on that file; a hang would never end.
SECONDS = 20

# Runs dqfd.py's own command-line code (runpy, as `python dqfd.py` would) on each file in turn, in one process,
# and prints one JSON line per file: how it exited, its stderr and its time. A crash ends the process.
DRIVER = """
import contextlib, io, json, runpy, sys, time, traceback
import gymnasium, numpy, torch, tyro, torch.utils.tensorboard  # imported before the clock starts
script, flags, paths = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
for path in ["missing.npy", *paths]:  # the first run, on a missing file, warms up what the script loads
    sys.argv, stderr, start = [script, "--demo-path", path, *flags], io.StringIO(), time.time()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code
    except BaseException:
        code, _ = "exception", stderr.write(traceback.format_exc())
    if path != "missing.npy":
        print(json.dumps({"exit": code, "stderr": stderr.getvalue(), "seconds": time.time() - start}), flush=True)
"""


def test_every_crafted_file_ends_in_one_sentence_through_the_command_line(tmp_path):
    paths = [kind(tmp_path) for kind, _ in CRAFTED]
    result = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT / "dqfd.py"), json.dumps(TINY_RUN), *paths],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0, (f"the loader process died ({result.returncode}) on {CRAFTED[len(reports)][0].__name__}: "
                                    f"{result.stderr[-2000:]}")
    for (kind, words), report in zip(CRAFTED, reports):
        lines = report["stderr"].splitlines()
        assert report["exit"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (kind.__name__, report)
        assert words in lines[0], (kind.__name__, lines[0])
        assert report["seconds"] < SECONDS, (kind.__name__, report["seconds"])
    assert len(reports) == len(CRAFTED)
    assert not (tmp_path / CANARY).exists() and not (tmp_path / "runs").exists()


def test_a_forged_file_as_a_user_runs_it(tmp_path):
    """The file numpy's own loader dies on (below), in a process of its own, as a user starts it."""
    result = run_script("dqfd.py", "--demo-path", forged_object_dtype_through_frombuffer(tmp_path), *TINY_RUN,
                        cwd=tmp_path, timeout=120)
    assert_one_line_error(result, "error: ", "frombuffer.npy is truncated or corrupt")
    assert result.returncode == 2 and not (tmp_path / "runs").exists()


def test_the_fixtures_are_real(tmp_path):
    """numpy's own loader, with pickles allowed, runs the payload and crashes on the forged dtype."""
    load = "import sys, numpy; print(numpy.load(sys.argv[1], allow_pickle=True))"
    result = subprocess.run([sys.executable, "-c", load, os_system(tmp_path)], cwd=tmp_path, capture_output=True)
    assert (tmp_path / CANARY).exists()
    for forged in [forged_object_dtype_through_frombuffer(tmp_path), forged_dtype_flags(tmp_path)]:
        result = subprocess.run([sys.executable, "-c", load, forged], cwd=tmp_path, capture_output=True)
        if result.returncode > 0:  # a traceback, not a crash
            pytest.skip(f"numpy {np.__version__} refuses the forged dtype itself")
        assert result.returncode < 0, result  # killed by a signal: SIGSEGV with numpy 2.4


def test_a_state_far_outside_the_bounds_warns_in_one_line_and_trains(tmp_path):
    episode = [[np.zeros(4, dtype=np.float32), t % 2, 1.0, np.zeros(4, dtype=np.float32), False] for t in range(20)]
    episode[3][0] = np.array([1e6, 0, 0, 0], dtype=np.float32)  # CartPole's position lies within +-4.8
    result = run_script("dqfd.py", "--demo-path", saved(tmp_path / "d.npy", object_array([episode])), *TINY_RUN,
                        cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "episode 0, step 3: the state" in lines[0], lines


def test_a_memo_index_far_past_the_pickle_allocates_nothing(tmp_path):
    """LONG_BINPUT 2^27 would make pickle's unpickler grow its memo to 2^28 entries and fill them (2 GB): the walk over
    the opcodes refuses it before the unpickler starts."""
    path = npy(tmp_path / "memo.npy", whole(pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**27)))
    code = ("import resource, sys, dqfd, gymnasium as gym\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    dqfd.load_demonstrations(sys.argv[1], gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))\n"
            "except ValueError as error:\n    print(error)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")  # KiB on Linux
    result = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, capture_output=True, text=True, timeout=120)
    message, grown_kib = result.stdout.splitlines()
    assert "memo.npy is truncated or corrupt" in message and int(grown_kib) < 100_000, result


def test_a_fifo_put_in_the_file_s_place_after_its_check_does_not_block(tmp_path):
    """os.stat sees a regular file, then open() meets a FIFO that took its place: O_NONBLOCK keeps open() from waiting
    for a writer, and the empty read ends in one sentence."""
    os.mkfifo(tmp_path / "fifo.npy")
    code = ("import os, sys, dqfd, gymnasium as gym\n"
            "regular, check = os.stat(sys.argv[2]), os.stat\n"
            "os.stat = lambda path: regular if path == sys.argv[1] else check(path)\n"
            "try:\n    dqfd.load_demonstrations(sys.argv[1], gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))\n"
            "except ValueError as error:\n    print(error)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fifo.npy"), str(ROOT / "demo_traj_2.npy")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "fifo.npy is truncated or corrupt" in result.stdout, result


def test_numeric_array_takes_exactly_the_bytes_its_shape_needs():
    # (2, 3) float32: 2 * 3 * 4 = 24 bytes, no more and no fewer
    array = dqfd.numeric_array(np.arange(6, dtype="<f4").tobytes(), np.dtype("<f4"), (2, 3))
    np.testing.assert_array_equal(array, [[0, 1, 2], [3, 4, 5]])
    for data, dtype, shape in [(bytes(23), "<f4", (2, 3)), (bytes(25), "<f4", (2, 3)), (bytes(8), "O", (1,)),
                               (bytes(8), "<f8", (-1,)), (bytes(8), "<f8", (1.0,)), ([0.0], "<f8", (1,)),
                               (bytes(16), "<c8", (2,)), (bytes(0), "<f8", (10**15,))]:
        with pytest.raises((ValueError, TypeError)):  # a list of numbers is no buffer: np.frombuffer raises TypeError
            dqfd.numeric_array(data, np.dtype(dtype), shape)


def test_as_numbers_converts_only_the_shape_asked_for():
    np.testing.assert_array_equal(dqfd.as_numbers([[1, 2], (3, np.float32(4))], (2, 2), "x"), [[1, 2], [3, 4]])
    assert dqfd.as_numbers(np.int64(3), (), "x") == 3.0 and dqfd.as_numbers(True, (), "x") == 1.0
    assert dqfd.as_numbers(10**400, (), "x") == np.inf  # too large for a float: infinite, then refused as such
    for value, shape in [([1, 2, 3], (2,)), (np.zeros(3), (4,)), ("1.0", ()), (None, ()), ([[1]], ()),
                         (np.zeros((10**6, 0)), (4,)), ([1, [2]], (2,)), (1 + 2j, ())]:
        with pytest.raises(ValueError, match="^the state is .*, not (a number|numbers of shape)"):
            dqfd.as_numbers(value, shape, "the state")
