//! Rank discovery: which of the job's processes this one is, whoever started it.
//!
//! A job is `size` processes numbered `0 <= rank < size`. `rdmem-run -n N PROGRAM` starts
//! them and sets `RDMEM_RANK`/`RDMEM_SIZE`; programs started by `mpirun` or `srun` instead
//! find their rank in those launchers' variables. [`Rank::from_env`] reads the first pair of
//! [`SOURCES`] that is set, in this order:
//!
//! | launcher                  | rank                   | size                   |
//! |---------------------------|------------------------|------------------------|
//! | `rdmem-run`               | `RDMEM_RANK`           | `RDMEM_SIZE`           |
//! | Open MPI `mpirun`         | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` |
//! | MPICH / Intel MPI (hydra) | `PMI_RANK`             | `PMI_SIZE`             |
//! | Slurm `srun`              | `SLURM_PROCID`         | `SLURM_NTASKS`         |
//!
//! When none is set the process is alone: rank 0 of 1. A pair that is set must be whole and
//! consistent (`size >= 1`, `rank < size`); otherwise [`LaunchError`] says which variable is
//! wrong, rather than the process guessing a rank and colliding with another one.

/// The variable pairs `(rank, size)` that [`Rank::from_env`] reads, first match wins.
pub const SOURCES: [(&str, &str); 4] = [
    (RANK_VAR, SIZE_VAR),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
];

/// The rank variable `rdmem-run` sets.
pub const RANK_VAR: &str = "RDMEM_RANK";

/// The size variable `rdmem-run` sets.
pub const SIZE_VAR: &str = "RDMEM_SIZE";

/// Why the rank could not be read from the environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// A rank or size variable does not hold a non-negative integer that fits in 32 bits.
    #[error("{var}={value:?} is not a number; it must be a non-negative integer")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The rank is not below the size.
    #[error("{rank_var}={rank} is not below {size_var}={size}; ranks run from 0 to size - 1")]
    RankOutOfRange {
        /// The rank variable.
        rank_var: &'static str,
        /// The rank.
        rank: u32,
        /// The size variable.
        size_var: &'static str,
        /// The size.
        size: u32,
    },
    /// The size is 0: a job has at least one process.
    #[error("{var}=0: a job has at least one process")]
    ZeroSize {
        /// The size variable.
        var: &'static str,
    },
    /// One variable of a pair is set and the other is not.
    #[error("{set} is set but {missing} is not; set both or neither")]
    HalfSet {
        /// The variable that is set.
        set: &'static str,
        /// The variable that is missing.
        missing: &'static str,
    },
}

/// This process's place in the job: `0 <= rank < size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rank {
    /// This process's number, `0..size`.
    pub rank: u32,
    /// Processes in the job.
    pub size: u32,
}

impl Rank {
    /// Reads the rank from the process environment (see the [module docs](self) for the
    /// variables and their order). A variable set to the empty string counts as unset, as in
    /// [`rdmem_core::ClusterConfig::load`]; a value that is not valid UTF-8 is an error.
    pub fn from_env() -> Result<Rank, LaunchError> {
        Rank::from_vars(|name| {
            std::env::var_os(name).filter(|v| !v.is_empty()).map(|v| v.to_string_lossy().into_owned())
        })
    }

    /// Reads the rank through `var` (`Some(value)` for a set variable), so that tests need not
    /// touch the process environment. The first pair of [`SOURCES`] with either variable set
    /// decides; no pair set gives rank 0 of 1.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Rank, LaunchError> {
        for (rank_var, size_var) in SOURCES {
            let (rank, size) = match (var(rank_var), var(size_var)) {
                (None, None) => continue,
                (Some(_), None) => return Err(LaunchError::HalfSet { set: rank_var, missing: size_var }),
                (None, Some(_)) => return Err(LaunchError::HalfSet { set: size_var, missing: rank_var }),
                (Some(rank), Some(size)) => (number(rank_var, rank)?, number(size_var, size)?),
            };
            if size == 0 {
                return Err(LaunchError::ZeroSize { var: size_var });
            }
            if rank >= size {
                return Err(LaunchError::RankOutOfRange { rank_var, rank, size_var, size });
            }
            return Ok(Rank { rank, size });
        }
        Ok(Rank { rank: 0, size: 1 })
    }
}

/// `value` as a number, surrounding whitespace ignored.
fn number(var: &'static str, value: String) -> Result<u32, LaunchError> {
    value.trim().parse().map_err(|_| LaunchError::NotANumber { var, value })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// `from_vars` over exactly these variables.
    fn rank(vars: &[(&str, &str)]) -> Result<Rank, LaunchError> {
        let vars: HashMap<String, String> = vars.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect();
        Rank::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn alone_without_variables() {
        assert_eq!(rank(&[]), Ok(Rank { rank: 0, size: 1 }));
        // Unrelated variables of the same launchers do not count.
        assert_eq!(rank(&[("SLURM_JOB_ID", "7"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")]), Ok(Rank { rank: 0, size: 1 }));
    }

    #[test]
    fn each_source() {
        assert_eq!(rank(&[("RDMEM_RANK", "2"), ("RDMEM_SIZE", "4")]), Ok(Rank { rank: 2, size: 4 }));
        assert_eq!(
            rank(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]),
            Ok(Rank { rank: 1, size: 2 })
        );
        assert_eq!(rank(&[("PMI_RANK", "0"), ("PMI_SIZE", "3")]), Ok(Rank { rank: 0, size: 3 }));
        assert_eq!(rank(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "6")]), Ok(Rank { rank: 5, size: 6 }));
        // Whitespace around the number is tolerated.
        assert_eq!(rank(&[("PMI_RANK", " 1\n"), ("PMI_SIZE", "2 ")]), Ok(Rank { rank: 1, size: 2 }));
    }

    #[test]
    fn first_set_pair_wins() {
        let all = [
            ("RDMEM_RANK", "0"),
            ("RDMEM_SIZE", "1"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("PMI_RANK", "2"),
            ("PMI_SIZE", "3"),
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
        ];
        // Drop the pairs one by one from the front: the next one decides.
        for (i, expected) in [(0, 1), (1, 2), (2, 3), (3, 4)].into_iter().enumerate() {
            assert_eq!(rank(&all[2 * i..]), Ok(Rank { rank: expected.0, size: expected.1 }));
        }
        // mpirun inside a Slurm allocation: Open MPI's variables win over Slurm's.
        let nested = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
        ];
        assert_eq!(rank(&nested), Ok(Rank { rank: 3, size: 8 }));
    }

    #[test]
    fn not_a_number() {
        assert_eq!(
            rank(&[("RDMEM_RANK", "one"), ("RDMEM_SIZE", "2")]),
            Err(LaunchError::NotANumber { var: "RDMEM_RANK", value: "one".into() })
        );
        assert_eq!(
            rank(&[("PMI_RANK", "0"), ("PMI_SIZE", "-3")]),
            Err(LaunchError::NotANumber { var: "PMI_SIZE", value: "-3".into() })
        );
        assert_eq!(
            rank(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "99999999999")]),
            Err(LaunchError::NotANumber { var: "SLURM_NTASKS", value: "99999999999".into() })
        );
        // The message names the variable and the value.
        let message = rank(&[("RDMEM_RANK", "x1"), ("RDMEM_SIZE", "2")]).unwrap_err().to_string();
        assert!(message.contains("RDMEM_RANK") && message.contains("\"x1\""), "{message}");
    }

    #[test]
    fn rank_out_of_range() {
        let err = rank(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "2")]).unwrap_err();
        assert_eq!(
            err,
            LaunchError::RankOutOfRange {
                rank_var: "OMPI_COMM_WORLD_RANK",
                rank: 2,
                size_var: "OMPI_COMM_WORLD_SIZE",
                size: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "OMPI_COMM_WORLD_RANK=2 is not below OMPI_COMM_WORLD_SIZE=2; ranks run from 0 to size - 1"
        );
    }

    #[test]
    fn zero_size() {
        // Size 0 is reported as such, not as rank 0 being out of range.
        assert_eq!(rank(&[("RDMEM_RANK", "0"), ("RDMEM_SIZE", "0")]), Err(LaunchError::ZeroSize { var: "RDMEM_SIZE" }));
    }

    #[test]
    fn half_set_pair() {
        assert_eq!(
            rank(&[("RDMEM_RANK", "0")]),
            Err(LaunchError::HalfSet { set: "RDMEM_RANK", missing: "RDMEM_SIZE" })
        );
        assert_eq!(rank(&[("PMI_SIZE", "4")]), Err(LaunchError::HalfSet { set: "PMI_SIZE", missing: "PMI_RANK" }));
        // A broken pair is an error even when a later pair is whole: guessing could give two
        // processes the same rank.
        assert_eq!(
            rank(&[("SLURM_PROCID", "0")]),
            Err(LaunchError::HalfSet { set: "SLURM_PROCID", missing: "SLURM_NTASKS" })
        );
        assert_eq!(
            rank(&[("OMPI_COMM_WORLD_SIZE", "2"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]),
            Err(LaunchError::HalfSet { set: "OMPI_COMM_WORLD_SIZE", missing: "OMPI_COMM_WORLD_RANK" })
        );
    }
}
