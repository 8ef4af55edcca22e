"""Gestational age from head circumference (Hadlock et al., 1984).

  GA (weeks) = 8.96 + 0.540 * HC + 0.0003 * HC**3,   HC in cm

F. P. Hadlock, R. B. Harrist, R. J. Shah, R. L. Deter, S. K. Park.
"Estimating fetal age: computer-assisted analysis of multiple fetal growth
parameters." Radiology 152(2): 497-501, 1984. The regression was fitted on
fetuses of 14 to 42 weeks; an age outside that range is an extrapolation and
is flagged. NumPy only; works on floats and arrays.
"""

import numpy as np

# The gestational ages the formula was fitted on, in weeks.
HADLOCK_RANGE_WEEKS = (14.0, 42.0)
OUTSIDE_RANGE_FLAG = 'outside 14-42 weeks'


def hadlock_ga_weeks(hc_mm):
  """Gestational age in weeks from HC by Hadlock (1984).

  Args:
    hc_mm: head circumference in millimetres (float or array; NaN stays NaN).

  Returns:
    Gestational age in weeks, same shape as `hc_mm` (a float for a float).
  """
  hc_cm = np.asarray(hc_mm, np.float64) / 10.0
  weeks = 8.96 + 0.540 * hc_cm + 0.0003 * hc_cm**3
  return float(weeks) if np.ndim(weeks) == 0 else weeks


def ga_flag(ga_weeks) -> str:
  """'' inside the formula's 14-42 weeks (edges included), else a warning.

  Args:
    ga_weeks: one gestational age in weeks; NaN (unknown) gives ''.

  Returns:
    '' or `OUTSIDE_RANGE_FLAG`.
  """
  low, high = HADLOCK_RANGE_WEEKS
  if ga_weeks < low or ga_weeks > high:  # False for NaN.
    return OUTSIDE_RANGE_FLAG
  return ''
