"""Entry point of processes started with a Python target: ``python -m dragon._worker``.

The parent passes the cloudpickled ``(target, args, kwargs)`` in ``DRAGON_WORKER_PAYLOAD``
(base64) or, when large, in a private file named by ``DRAGON_WORKER_PAYLOAD_FILE`` (read
once, then removed) or, for a process on another node, under the key
``DRAGON_WORKER_PAYLOAD_KEY`` of the runtime's registry (taken once). An exception in the
target is printed to stderr the way DragonHPC prints it, written to ``DRAGON_WORKER_RESULT``
(a file) or registered under ``DRAGON_WORKER_RESULT_KEY`` (another node's parent) for the
parent's ``DragonUserCodeError``, and ends the process with exit code 1.
"""

import binascii  # not base64: that imports re, which costs a short-lived process ~10 ms
import os
import pickle
import sys

BANNER = "*** Exception Occurred in User-Provided Code ***"


def _load():
    # Plain pickle.loads reads cloudpickle's output too (it imports cloudpickle only when the
    # payload needs it), which keeps the start of a process short.
    data = os.environ.pop("DRAGON_WORKER_PAYLOAD", None)
    if data is not None:
        return pickle.loads(binascii.a2b_base64(data))
    key = os.environ.pop("DRAGON_WORKER_PAYLOAD_KEY", None)
    if key is not None:
        from dragon import _runtime

        data = _runtime.agent().unregister("payload", key)
        if data is None:
            raise RuntimeError(f"the payload {key} of this process is not in the runtime's registry")
        return pickle.loads(data)
    path = os.environ.pop("DRAGON_WORKER_PAYLOAD_FILE")
    try:
        with open(path, "rb") as f:
            return pickle.loads(f.read())
    finally:
        os.unlink(path)


def main() -> int:
    result = os.environ.pop("DRAGON_WORKER_RESULT", None)
    result_key = os.environ.pop("DRAGON_WORKER_RESULT_KEY", None)
    try:
        target, args, kwargs = _load()
        target(*args, **kwargs)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        import traceback

        text = traceback.format_exc()
        print(BANNER, file=sys.stderr)
        print(text, file=sys.stderr, end="")
        sys.stderr.flush()
        if result:
            try:
                with open(result, "w") as f:
                    f.write(text)
            except OSError:
                pass
        if result_key:
            from dragon import _runtime

            try:
                _runtime.agent().register("result", result_key, text.encode(), replace=True)
            except Exception:
                pass
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
