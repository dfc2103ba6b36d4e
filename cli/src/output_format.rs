//! `-o/--output`, as kubectl takes it: a global option of `kubeshift` (before or after the
//! subcommand), naming the format of what a command prints.
//!
//! Commands that print a report keep their own `-o` too, for their own help, default and
//! list of formats. clap gives a global option and a subcommand's option of the same
//! name one value (the innermost one given wins), so both must have one type:
//! [`OutputFormat`], every format any command writes. A command's own `-o` accepts
//! only its formats ([`formats`]); a format given before the subcommand is checked when
//! the command runs ([`narrow`]).

use anyhow::{anyhow, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people (`migrate plan`, `migrate status`).
    Table,
    /// Plain text for people (`lab status`, `connectivity test`).
    Text,
    /// One line per flow (`observe`).
    Compact,
    Yaml,
    Json,
    /// `migrate runbook`.
    Markdown,
    /// `migrate runbook`.
    Html,
}

impl OutputFormat {
    pub fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

/// The parser of a command's own `-o`: the formats of `T` (the command's enum, whose
/// help texts it shows), yielding the shared [`OutputFormat`].
pub fn formats<T: ValueEnum + 'static>() -> impl TypedValueParser<Value = OutputFormat> {
    PossibleValuesParser::new(T::value_variants().iter().filter_map(ValueEnum::to_possible_value)).map(|s| {
        OutputFormat::from_str(&s, false)
            .unwrap_or_else(|_| panic!("-o {s}: a command's format that OutputFormat lacks"))
    })
}

/// The command's own format for `f`, or why it has none (`-o` given before the
/// subcommand, which the global option's parser accepted for any command).
pub fn narrow<T: ValueEnum>(f: OutputFormat, command: &str) -> Result<T> {
    T::from_str(&f.name(), false).map_err(|_| {
        let takes: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_string())
            .collect();
        anyhow!("-o {}: `kubeshift {command}` writes {}", f.name(), takes.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_commands_format_is_an_output_format() {
        fn check<T: ValueEnum>() {
            for v in T::value_variants() {
                let name = v.to_possible_value().unwrap().get_name().to_string();
                assert!(OutputFormat::from_str(&name, false).is_ok(), "{name}");
            }
        }
        check::<crate::migrate_cmd::Output>();
        check::<crate::runbook::Format>();
        check::<crate::observe::output::Format>();
        check::<crate::lab_cmd::StatusOutput>();
        check::<crate::connectivity_cmd::TestOutput>();
    }

    #[test]
    fn narrow_names_the_command_and_its_formats() {
        assert!(matches!(narrow(OutputFormat::Yaml, "migrate plan"), Ok(crate::migrate_cmd::Output::Yaml)));
        let e = narrow::<crate::observe::output::Format>(OutputFormat::Table, "observe").unwrap_err().to_string();
        assert_eq!(e, "-o table: `kubeshift observe` writes compact, json");
    }
}
