"""Mutation check: each mutation below breaks the method on purpose; its tests must fail.

  python tests/mutations.py [--baseline] [--keep] [NAME ...]   (by hand; pytest skips it)

Copies the checkout (`git ls-files`, plus untracked tests) to a temporary folder. For each
mutation (all, or the NAMEs given) it replaces OLD by NEW in FILE there (OLD must occur
exactly once, else it stops: the code moved, update the entry), runs `pytest T` in the copy
for each space-separated T of TESTS (each must fail on its own), and puts the file back.
--baseline first runs every T unmutated (each must pass). Prints a table (mutation, test,
result, seconds); exits 1 if a mutation survives a test or a run errs (nothing collected).

Entries are data: add a dict to MUTATIONS. Where each comes from: issue 21 (BUILD.md,
"Mutation check", has the last table).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

MUTATIONS = [
    # -- 1: shuffle-BN becomes local BN on every multi-replica run. (test_model.py's
    # BN-free 2-replica test cannot see it: it once failed only on a stale name here.)
    dict(name="shuffle_bn_identity_across_replicas", file="co2_tf/method/model.py",
         old="perm = tf.argsort(noise, stable=True)",
         new="perm = tf.argsort(noise, stable=True) if n == 1 else tf.range(b * n)",
         tests="tests/test_model_reference.py"
               "::test_shuffle_bn_across_two_replicas_matches_the_reference"),
    # -- 2: InfoNCE in the step's objective given tau_con; the keys through the query head.
    dict(name="info_nce_with_consistency_temperature", file="co2_tf/method/objective.py",
         old="co2_terms(q, k, queue, self.temperature, self.consistency_temperature,",
         new="co2_terms(q, k, queue, self.consistency_temperature, self.consistency_temperature,",
         tests="tests/test_model_reference.py"),
    dict(name="keys_through_query_head", file="co2_tf/method/model.py",
         old="z = [self.key_head(self.key_backbone(p, training=True), training=True)",
         new="z = [self.query_head(self.key_backbone(p, training=True), training=True)",
         tests="tests/test_model_reference.py"),
    # -- 3: the config -> model wiring (the objective built from the config, the model's knobs).
    dict(name="build_drops_consistency_over", file="co2_tf/method/objective.py",
         old="weight=weight, over=config.consistency_over, kl=config.consistency_kl,",
         new="weight=weight, kl=config.consistency_kl,",
         tests="tests/test_build.py"),
    dict(name="build_drops_consistency_kl", file="co2_tf/method/objective.py",
         old="weight=weight, over=config.consistency_over, kl=config.consistency_kl,",
         new="weight=weight, over=config.consistency_over,",
         tests="tests/test_build.py"),
    dict(name="build_drops_ema_momentum", file="co2_tf/build.py",
         old="queue_size=config.queue_size, ema_momentum=config.ema_momentum,",
         new="queue_size=config.queue_size,",
         tests="tests/test_build.py"),
    dict(name="no_warmup_ramp", file="co2_tf/method/objective.py",
         old="return self.weight * consistency_ramp(step, self.warmup_steps)",
         new="return self.weight",
         tests="tests/test_build.py"),
    # -- 4: a resume that silently restarts at step 0 (restore made a no-op, two ways).
    dict(name="resume_finds_no_checkpoint", file="co2_tf/run/checkpoints.py",
         old="paths, state = candidates(ckpt_dir)",
         new="paths, state = [], None",
         tests="tests/test_train.py::test_kill9_then_rerun_resumes_to_the_same_end "
               "tests/test_remote_paths.py::test_library_chain_on_ram_uris"),
    dict(name="resume_restores_nothing", file="co2_tf/run/checkpoints.py",
         old="make_checkpoint(has_step).restore(path).assert_existing_objects_matched()",
         new="make_checkpoint(has_step)",
         tests="tests/test_train.py::test_kill9_then_rerun_resumes_to_the_same_end "
               "tests/test_remote_paths.py::test_library_chain_on_ram_uris"),
    # -- 6: alpha ignored (the objective built with MoCo's alpha = 0; the loss without L_con).
    dict(name="alpha_ignored_by_build", file="co2_tf/method/objective.py",
         old="    weight = config.consistency_weight\n",
         new="    weight = 0.0\n",
         tests="tests/test_train.py::test_training_beats_random_init"),
    dict(name="alpha_ignored_in_loss", file="co2_tf/method/objective.py",
         old='total = terms["loss_ins"] + alpha * terms["loss_con"]',
         new='total = terms["loss_ins"] + 0.0 * terms["loss_con"]',
         tests="tests/test_train.py::test_training_beats_random_init"),
    dict(name="study_spread_is_population_std", file="research/study_runs.py",
         old="scale * statistics.stdev(values)",
         new="scale * statistics.pstdev(values)",
         tests="tests/test_study.py::test_the_table_is_the_mean_and_sample_std_over_seeds"),
    dict(name="paired_utilisation_is_a_mean", file="benchmarks/benchmark_lib.py",
         old='result["utilisation_paired_median"] = round(_median(ratios), 3)',
         new='result["utilisation_paired_median"] = round(statistics.fmean(ratios), 3)',
         tests="tests/test_benchmark.py::test_paired_utilisation_is_the_median_of_the_rounds"),
    # -- 7: compat's early return deleted.
    dict(name="keras_compat_builds_again", file="co2_tf/compat.py",
         old="self.optimizer.built:\n            return\n",
         new="self.optimizer.built:\n            pass\n",
         tests="tests/test_compat.py"),
    # -- 8: neg_sim logged as the hardest negative.
    dict(name="neg_sim_is_max", file="co2_tf/method/losses.py",
         old='"neg_sim": tf.reduce_mean(q_neg, axis=-1),',
         new='"neg_sim": tf.reduce_max(q_neg, axis=-1),',
         tests="tests/test_model_reference.py"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_checkout(dest):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):  # a file deleted but not yet committed: skipped
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(dest, name))
    # Tests added but not yet committed (e.g. while writing one): copied too.
    for name in subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard",
                                "tests"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0"):
        if name.endswith(".py"):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


def run_tests(copy, tests, log):
    """pytest's exit code and the seconds it took (output appended to `log`)."""
    start = time.time()
    with open(log, "a") as out:
        out.write(f"\n===== pytest {tests}\n")
        out.flush()
        # -o addopts=: no --durations and no xdist options; -x: the first failure suffices.
        code = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             "-o", "addopts="] + tests.split(), cwd=copy, stdout=out,
            stderr=subprocess.STDOUT).returncode
    return code, time.time() - start


def outcome(code, mutated):
    # pytest: 0 all passed, 1 some failed, else an error (4 usage, 5 nothing collected).
    if code not in (0, 1):
        return f"error (pytest exit {code})"
    if mutated:
        return "killed" if code == 1 else "SURVIVED"
    return "passes" if code == 0 else "FAILS"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--baseline", action="store_true",
                        help="first run each mutation's tests unmutated (must pass)")
    parser.add_argument("--keep", action="store_true", help="keep the copy and its log")
    args = parser.parse_args()
    known = {m["name"]: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        sys.exit(f"error: unknown mutation(s) {unknown}: one of {sorted(known)}")
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS

    copy = tempfile.mkdtemp(prefix="co2_mutations_")
    log = os.path.join(copy, "mutations.log")
    copy_checkout(copy)
    rows, bad = [], False
    try:
        if args.baseline:
            for tests in dict.fromkeys(t for m in chosen for t in m["tests"].split()):
                code, seconds = run_tests(copy, tests, log)
                rows.append(("(none: baseline)", tests, outcome(code, False), seconds))
                bad |= code != 0
        for m in chosen:
            path = os.path.join(copy, m["file"])
            with open(path) as f:
                original = f.read()
            count = original.count(m["old"])
            if count != 1:
                sys.exit(f"error: mutation {m['name']}: its old text occurs {count} times in "
                         f"{m['file']} (expected once): update the entry")
            with open(path, "w") as f:
                f.write(original.replace(m["old"], m["new"]))
            try:
                for tests in m["tests"].split():  # each test on its own: each must catch it
                    code, seconds = run_tests(copy, tests, log)
                    rows.append((m["name"], tests, outcome(code, True), seconds))
                    bad |= code != 1
                    print(f"{m['name']} {tests}: {rows[-1][2]} ({seconds:.0f} s)",
                          file=sys.stderr, flush=True)
            finally:
                with open(path, "w") as f:
                    f.write(original)
    finally:
        print("| mutation | tests | result | seconds |\n|---|---|---|---|")
        for name, tests, result, seconds in rows:
            print(f"| {name} | {tests} | {result} | {seconds:.0f} |")
        if args.keep or bad:
            print(f"pytest output: {log}", file=sys.stderr)
        else:
            shutil.rmtree(copy, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
