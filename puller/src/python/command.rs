//! What a `python3` command line runs as its main module, read the way
//! CPython reads its options (`python3 --help`).

/// The main module of a Python command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Main {
    /// `-c CODE`.
    Code(String),
    /// `-m MODULE`.
    Module(String),
    /// A script's path, as given.
    Script(String),
}

/// Options that take a value (`-W default`, `-Wdefault`).
const WITH_VALUE: &[char] = &['W', 'X'];

/// The main module of `python3 ARGS` (`args`: after the program's name);
/// `None` for an interactive interpreter, code on standard input, or a
/// command line CPython would refuse.
pub fn main_of(args: &[String]) -> Option<Main> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            return args.next().map(|s| Main::Script(s.clone()));
        }
        if arg.starts_with("--") {
            // --check-hash-based-pycs MODE; --help and --version exit.
            if arg == "--check-hash-based-pycs" {
                args.next()?;
                continue;
            }
            return None;
        }
        let Some(flags) = arg.strip_prefix('-') else {
            return Some(Main::Script(arg.clone()));
        };
        if flags.is_empty() {
            return None; // `-`: standard input.
        }
        // Flags combine (`-uB`); one that takes a value takes the rest of
        // this argument, or the next one.
        for (at, flag) in flags.char_indices() {
            let rest = &flags[at + flag.len_utf8()..];
            let value = |args: &mut std::slice::Iter<String>| -> Option<String> {
                if rest.is_empty() {
                    args.next().cloned()
                } else {
                    Some(rest.to_string())
                }
            };
            match flag {
                'c' => return value(&mut args).map(Main::Code),
                'm' => return value(&mut args).map(Main::Module),
                f if WITH_VALUE.contains(&f) => {
                    value(&mut args)?;
                    break;
                }
                'h' | 'V' | '?' => return None,
                _ => {}
            }
        }
    }
    None
}

/// The CPython cache tag of interpreter file `name` (`python3.11` ->
/// `cpython-311`), for the `.pyc` files it reads.
pub fn cache_tag(name: &str) -> Option<String> {
    let minor = name.strip_prefix("python3.")?;
    (!minor.is_empty() && minor.len() <= 3 && minor.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("cpython-3{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn main(args: &[&str]) -> Option<Main> {
        main_of(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn finds_the_main_module_as_cpython_does() {
        assert_eq!(
            main(&["-c", "import numpy"]),
            Some(Main::Code("import numpy".into()))
        );
        assert_eq!(main(&["-uBcimport x"]), Some(Main::Code("import x".into())));
        assert_eq!(
            main(&["-W", "ignore", "-X", "dev", "-m", "http.server", "8000"]),
            Some(Main::Module("http.server".into()))
        );
        assert_eq!(
            main(&["-Wignore", "-OO", "app/main.py", "-c", "x"]),
            Some(Main::Script("app/main.py".into()))
        );
        assert_eq!(
            main(&["--check-hash-based-pycs", "never", "--", "-weird.py"]),
            Some(Main::Script("-weird.py".into()))
        );
        for none in [&[][..], &["-"], &["-i"], &["--version"], &["-c"], &["-h"]] {
            assert_eq!(main(none), None, "{none:?}");
        }
    }

    #[test]
    fn cache_tags() {
        assert_eq!(cache_tag("python3.11").as_deref(), Some("cpython-311"));
        assert_eq!(cache_tag("python3.8").as_deref(), Some("cpython-38"));
        for none in [
            "python3",
            "python3.",
            "python3.11m",
            "python2.7",
            "python3.1234",
        ] {
            assert_eq!(cache_tag(none), None, "{none}");
        }
    }
}
