"""Cross-validation members: finding their runs and checking them.

Each member of a scoring (`hc_jax.evaluation.cv.score`) is a run directory
(it holds config.json) or a directory of fold runs `fold<k>/` as
`hc_jax.grid` writes them (`ROOT/<config>/`, and with `--seeds`
`ROOT/<config>_seed<s>/`, one member per seed). A `fold<k>/` may also hold
several runs of its fold (`fold<k>/seed<s>/`): the member's prediction is
then their mean, as `hc_jax.evaluation.inference` makes it. Every member
must hold the same folds, and every run the same fold assignment (the images
of its folds.json), so that fold k's test images are predicted by fold k's
runs only: no member has seen the images it is scored on, in training or in
selection.

A shipped model's archive (`hc_jax.shipped`, e.g.
`hc_jax/shipped/hcnet_mask.npz`) is a member too: each of its fold models
predicts its own test fold, the folds drawn again from the HC18 CSV with the
members' own fold settings (an archive keeps no folds.json).

The HC18 copy scored on is checked to be the one the runs trained on (the
source digest they recorded), and its training CSV gives each image's pixel
size and reference HC.
"""

import os
from typing import Sequence

from hc_jax import archive as archive_lib
from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.data import folds as folds_lib
from hc_jax.data import hc18

class ScoreError(ValueError):
  """Runs that cannot be scored as asked (the command line exits 2)."""


def member_runs(root: str) -> dict[int, str]:
  """{fold: workdir} of one member.

  Args:
    root: a finished run (holds config.json), or a directory of `fold<k>/`
      workdirs, each a run or a directory of runs of that fold (e.g. one per
      seed, `fold<k>/seed<s>/`: their mean is the member's prediction, as
      `hc_jax.evaluation.loading.load` makes it).

  Returns:
    The workdirs by test fold (the fold of their runs' config.json), sorted.

  Raises:
    ScoreError: no such directory, no run in it, an unfinished run, or a
      `fold<k>/` whose runs are of another fold.
  """
  if archive_lib.is_archive(root):
    return _archive_members(root)
  if not os.path.isdir(root):
    raise ScoreError(f'{root} does not exist')
  if os.path.isfile(os.path.join(root, workdir_lib.CONFIG_FILE)):
    candidates = [root]
  else:
    candidates = list(workdir_lib.fold_dirs(root).values())
    if not candidates:
      subdirs = sorted(name for name in os.listdir(root)
                       if os.path.isdir(os.path.join(root, name)))
      configs = [
          name for name in subdirs if any(
              workdir_lib.FOLD_DIR.match(sub)
              for sub in os.listdir(os.path.join(root, name)))
      ]
      runs = [
          name for name in subdirs
          if os.path.isfile(os.path.join(root, name, workdir_lib.CONFIG_FILE))
      ]
      hint = (f'; it holds configs ({", ".join(configs[:5])}): pass one of '
              'them' if configs else
              f'; it holds runs ({", ".join(runs[:5])}): pass each as a '
              'member, comma-separated' if runs else '')
      raise ScoreError(f'{root} holds no runs: neither config.json nor '
                       f'fold<k>/ run directories{hint}')
  found = {}
  for workdir in candidates:
    folds = sorted({_fold_of(run) for run in runs_in(workdir)})
    if len(folds) > 1:
      raise ScoreError(f'{workdir} holds runs of folds {folds}; one fold each')
    match = workdir_lib.FOLD_DIR.match(
        os.path.basename(os.path.normpath(workdir)))
    if workdir != root and match and int(match[1]) != folds[0]:
      raise ScoreError(f'{workdir} holds a run of fold {folds[0]}, not '
                       f'{match[1]}')
    found[folds[0]] = workdir
  return dict(sorted(found.items()))


def _archive(run: str):
  """The shipped-model archive (or the one member) a run label names."""
  try:
    return archive_lib.read(run)
  except workdir_lib.PredictError as e:
    raise ScoreError(str(e)) from None


def _archive_members(path: str) -> dict[int, str]:
  """{fold: '<archive>:<member>'} of a shipped model's fold members.

  Raises:
    ScoreError: not a shipped model, or two members of one fold.
  """
  archive = _archive(path)
  found = {}
  for run, config in zip(archive.runs, archive.configs):
    fold = config.get('fold')
    if isinstance(fold, bool) or not isinstance(fold, int):
      raise ScoreError(f'{run} has no integer fold')
    if fold in found:
      raise ScoreError(f'{path} holds two members of fold {fold} '
                       f'({found[fold]}, {run}); score one of them')
    found[fold] = run
  return dict(sorted(found.items()))


def _config(run: str) -> dict:
  """A run's config (its config.json, or a shipped member's)."""
  if archive_lib.is_archive(run):
    return _archive(run).configs[0]
  return workdir_lib.read_json(os.path.join(run, workdir_lib.CONFIG_FILE))


def runs_in(workdir: str) -> list[str]:
  """The finished runs of a workdir: itself, or its run subdirectories (a
  shipped member is its own run).

  Raises:
    ScoreError: none, or one without results.json.
  """
  if archive_lib.is_archive(workdir):
    return [workdir]
  try:
    return workdir_lib.run_dirs(workdir)
  except workdir_lib.PredictError as e:
    raise ScoreError(str(e)) from None


def _fold_of(run: str) -> int:
  fold = _config(run).get('fold')
  if isinstance(fold, bool) or not isinstance(fold, int):
    raise ScoreError(
        f'{os.path.join(run, workdir_lib.CONFIG_FILE)} has no integer fold')
  return fold


def member_label(root: str) -> str:
  """A member's short name: its directory, or the config above `fold<k>`."""
  parts = os.path.normpath(os.path.abspath(root)).split(os.sep)
  if workdir_lib.FOLD_DIR.match(parts[-1]) and len(parts) > 1:
    return parts[-2]
  return parts[-1]


def member_labels(roots: Sequence[str]) -> list[str]:
  """Distinct labels for the members (numbered where names repeat)."""
  labels = [member_label(root) for root in roots]
  if len(set(labels)) < len(labels):
    labels = [f'{label}_{i}' for i, label in enumerate(labels)]
  return labels


def read_assignment(run: str, hc18_dir: str | None = None
                    ) -> folds_lib.FoldAssignment:
  """The fold assignment a run trained under (its folds.json).

  A shipped member keeps no folds.json: its folds are drawn again, as
  training drew them, from the HC18 copy's CSV (`hc18_dir`, checked by
  `find_hc18_dir` to be the copy it trained on) with its config's
  `num_folds`, `val_fraction` and `fold_seed`.

  Raises:
    ScoreError: when it is missing or unreadable.
  """
  if archive_lib.is_archive(run):
    config = _config(run)
    reference = read_reference(hc18_dir or find_hc18_dir([run]))
    names = sorted(reference)
    try:
      return folds_lib.assign_folds(
          names, [reference[name][1] for name in names],
          num_folds=config['num_folds'], val_fraction=config['val_fraction'],
          seed=config['fold_seed'])
    except (KeyError, TypeError, ValueError) as e:
      raise ScoreError(f'{run}: its folds cannot be drawn again '
                       f'({log.error_line(e)})') from None
  path = os.path.join(run, workdir_lib.FOLDS_FILE)
  if not os.path.isfile(path):
    raise ScoreError(f'{run} has no {workdir_lib.FOLDS_FILE}')
  try:
    return folds_lib.FoldAssignment.from_json(path)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ScoreError(f'{path} cannot be read '
                     f'({log.error_line(e)})') from None


def check_members(roots: Sequence[str], unseen_test_ok: bool = False,
                  hc18_dir: str | None = None
                  ) -> tuple[list[dict[int, str]], folds_lib.FoldAssignment]:
  """Every member's runs, checked to share folds and fold assignment.

  Args:
    roots: the members (see `member_runs`; a shipped model's archive is a
      member whose fold models are its members).
    unseen_test_ok: also accept runs trained with `score_test=False`, whose
      test fold was kept unseen while settings are chosen on validation.
    hc18_dir: the HC18 copy the folds of shipped members are drawn from
      (None: `find_hc18_dir`'s).

  Returns:
    ([{fold: workdir} per member], the shared fold assignment).

  Raises:
    ScoreError: no members, a member twice, members with different folds,
      runs whose folds.json assign the images differently, or (unless
      `unseen_test_ok`) a run trained with `score_test=False`.
  """
  if not roots:
    raise ScoreError('no runs given')
  normalised = [os.path.realpath(root) for root in roots]
  if len(set(normalised)) < len(normalised):
    raise ScoreError(f'a member is given twice: {", ".join(roots)}')
  members = [member_runs(root) for root in roots]
  for root, runs in zip(roots[1:], members[1:]):
    for fold in sorted(set(members[0]) ^ set(runs)):
      has, lacks = (roots[0], root) if fold in members[0] else (root, roots[0])
      raise ScoreError(f'fold {fold} is in {has} but missing in {lacks}; '
                       'members must hold the same folds')
  every_run = all_runs(members)
  if not unseen_test_ok:
    for run in every_run:
      if _config(run).get('score_test') is False:
        raise ScoreError(
            f'{run} was trained with score_test=False: its test fold is '
            'kept unseen while settings are chosen on validation; pass '
            '--unseen_test_ok to score it anyway')
  if hc18_dir is None and any(archive_lib.is_archive(r) for r in every_run):
    hc18_dir = find_hc18_dir(every_run)
  assignment = read_assignment(every_run[0], hc18_dir)
  for run in every_run[1:]:
    other = read_assignment(run, hc18_dir)
    if (other.num_folds, other.images) != (assignment.num_folds,
                                           assignment.images):
      raise ScoreError(
          f'{run}/{workdir_lib.FOLDS_FILE} assigns the images to folds '
          f'differently from {every_run[0]}/{workdir_lib.FOLDS_FILE}; an '
          'ensemble needs one fold assignment')
  for fold in members[0]:
    if not 0 <= fold < assignment.num_folds:
      raise ScoreError(
          f'{members[0][fold]} is a run of fold {fold}, but its '
          f'{workdir_lib.FOLDS_FILE} has {assignment.num_folds} folds')
  return members, assignment


def all_runs(members: Sequence[dict[int, str]]) -> list[str]:
  """Every run of every member's workdirs."""
  return [run for workdirs in members for workdir in workdirs.values()
          for run in runs_in(workdir)]


def _source_digest(run: str) -> str | None:
  if archive_lib.is_archive(run):
    archive = _archive(run)
    documents = [archive.results[0], archive.configs[0]]
  else:
    documents = [
        workdir_lib.read_json(os.path.join(run, name))
        for name in (workdir_lib.RESULTS_FILE, workdir_lib.CONFIG_FILE)
    ]
  for document in documents:
    digest = document.get('source_digest')
    if digest:
      return str(digest)
  return None


def _configured_dir(run: str) -> str | None:
  """The HC18 directory a run's config names (or finds), or None."""
  data = _config(run).get('data', {})
  if data.get('source') == 'synthetic':  # Written into the run by training.
    return os.path.join(run, workdir_lib.SYNTHETIC_DIR)
  if data.get('hc18_dir') == 'download':
    return None
  return data.get('hc18_dir') or hc18.default_dir()


def find_hc18_dir(runs: Sequence[str], hc18_dir: str | None = None,
                  check_digest: bool = True) -> str:
  """The HC18 directory to score on, checked against what the runs used.

  Args:
    runs: every run that is scored.
    hc18_dir: the directory to use; None for the first that a run's config
      names (or `hc18.default_dir()`) and that holds the training CSV.
    check_digest: refuse a copy other than the one the runs trained on;
      False for a shifted copy (`python -m hc_jax.shifted`: the same scans'
      names, HC values and folds, another machine's look).

  Returns:
    A directory with training_set/ and its CSV.

  Raises:
    ScoreError: none found, no extracted training_set/, or a copy other than
      the one a run trained on (by the source digest it recorded).
  """
  # pylint: disable=import-outside-toplevel
  from hc_jax.data import digests
  folder, csv_name = hc18.SPLITS['train']
  if not hc18_dir:
    candidates = [_configured_dir(run) for run in runs]
    hc18_dir = next((path for path in candidates if path and os.path.isfile(
        os.path.join(path, csv_name))), None)
    if not hc18_dir:
      raise ScoreError('HC18 not found where the runs\' configs say nor by '
                       '$HC18_DIR or ../shared/hc18; pass --hc18_dir=DIR')
  if not os.path.isfile(os.path.join(hc18_dir, csv_name)):
    raise ScoreError(f'{hc18_dir} holds no {csv_name}')
  if not os.path.isdir(os.path.join(hc18_dir, folder)):
    raise ScoreError(f'{hc18_dir} has no {folder}/ directory (extract '
                     f'{folder}.zip there to score from its PNGs)')
  digest = digests.source_digest(hc18_dir)
  for run in runs:
    trained_on = _source_digest(run)
    if check_digest and trained_on and trained_on != digest:
      raise ScoreError(f'{run} trained on another HC18 copy (source digest '
                       f'{trained_on}) than {hc18_dir} ({digest}); pass '
                       '--hc18_dir of that copy')
  return hc18_dir


def read_reference(hc18_dir: str) -> dict[str, tuple[float, float]]:
  """{filename: (pixel size in mm, HC in mm)} of HC18's training CSV.

  Raises:
    hc18.HC18Error: listing every malformed row.
  """
  _, csv_name = hc18.SPLITS['train']
  problems = []
  # HC18's own CSV reader; the images are read only where they are scored.
  # pylint: disable=protected-access
  rows = hc18._read_csv(os.path.join(hc18_dir, csv_name), 3, problems)
  positive_number = hc18.positive_number
  # pylint: enable=protected-access
  reference = {}
  for row in rows:
    try:
      reference[row[0]] = (positive_number(row[1], 'pixel size (mm)'),
                           positive_number(row[2], 'head circumference (mm)'))
    except ValueError as e:
      problems.append(f'{csv_name}: {row[0]}: {e}')
  if problems:
    raise hc18.HC18Error(hc18_dir, problems)
  return reference
