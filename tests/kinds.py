"""Operation handlers used by tests only (registered per test, in-process)."""

import threading

calls: list[int] = []
abandons: list[int] = []  # runs whose on_abandon ran (abandoned)
release = threading.Event()
started = threading.Event()


def reset():
    calls.clear()
    abandons.clear()
    release.clear()
    started.clear()


def counting(ctx):
    calls.append(ctx.run.pk)
    ctx.info("step 1: doing the work")
    started.set()
    release.wait(30)
    ctx.progress(1, 1, "work done")
    ctx.info("step 2: finished")
    return {"calls": len(calls)}


def cooperative(ctx):
    calls.append(ctx.run.pk)
    started.set()
    release.wait(30)
    ctx.check_alive()  # raises RunCancelled when a cancel was requested
    return {}


def crashing(ctx):
    ctx.info("about to crash")
    raise ZeroDivisionError("division by zero in a handler")


def abandoned(run, ctx):
    abandons.append(run.pk)
