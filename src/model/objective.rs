//! The scalar objectives J whose activation gradients score the channels
//! (METHODS.md §3), named once for the backward pass, the statistics, the
//! memory plan and the command line; and the set of them a pass runs.
use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A scalar J whose activation gradients were accumulated (METHODS.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Objective {
    /// J = (1/n) Σ_t ½‖z_t‖²; fills `f2` and `k1`.
    Energy,
    /// Mean next-token cross-entropy; fills `tk`.
    Ce,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Energy => "energy",
            Objective::Ce => "ce",
        }
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Objective {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "energy" => Ok(Objective::Energy),
            "ce" => Ok(Objective::Ce),
            _ => Err(Error::Invalid(format!(
                "unknown objective {s:?} (valid: energy, ce)"
            ))),
        }
    }
}

/// Where the energy objective reads the residual stream (METHODS.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EnergyAt {
    /// z_t, the output of the final RMSNorm (the default).
    #[default]
    FinalNorm,
    /// x_L, the final residual before the norm.
    PreNorm,
}

impl fmt::Display for EnergyAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnergyAt::FinalNorm => "final-norm",
            EnergyAt::PreNorm => "pre-norm",
        })
    }
}

impl FromStr for EnergyAt {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "final-norm" => Ok(EnergyAt::FinalNorm),
            "pre-norm" => Ok(EnergyAt::PreNorm),
            _ => Err(Error::Invalid(format!(
                "unknown energy position {s:?} (valid: final-norm, pre-norm)"
            ))),
        }
    }
}

/// Which objectives a stats pass ran. At least one is set in a valid file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Objectives {
    pub energy: bool,
    pub ce: bool,
}

impl Objectives {
    pub fn has(self, o: Objective) -> bool {
        match o {
            Objective::Energy => self.energy,
            Objective::Ce => self.ce,
        }
    }

    /// No objective at all.
    pub fn is_empty(self) -> bool {
        !self.energy && !self.ce
    }

    /// The objectives of `self` that `have` lacks.
    pub fn without(self, have: Objectives) -> Objectives {
        Objectives {
            energy: self.energy && !have.energy,
            ce: self.ce && !have.ce,
        }
    }

    /// The objectives of either.
    pub fn union(self, other: Objectives) -> Objectives {
        Objectives {
            energy: self.energy || other.energy,
            ce: self.ce || other.ce,
        }
    }
}

/// `energy`, `ce`, `energy,ce`, or `none`.
impl fmt::Display for Objectives {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match (self.energy, self.ce) {
            (true, true) => "energy,ce",
            (true, false) => "energy",
            (false, true) => "ce",
            (false, false) => "none",
        };
        f.write_str(s)
    }
}

/// Parses a comma-separated list of objectives (`energy`, `ce,energy`, ...).
impl FromStr for Objectives {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut o = Objectives::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<Objective>()? {
                Objective::Energy => o.energy = true,
                Objective::Ce => o.ce = true,
            }
        }
        if o.is_empty() {
            return Err(Error::Invalid(format!(
                "no objective in {s:?} (valid: energy, ce)"
            )));
        }
        Ok(o)
    }
}
