// tools/slimgrad.cpp — the `slimgrad` command-line tool: registers the subcommands (one file
// each, see tools/cli.hpp) and turns every failure into one line on stderr.
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include "cli.hpp"

namespace slimgrad::tools {
/// `slimgrad replay`: tools/replay.cpp.
void add_replay_command(CLI::App& app);
/// `slimgrad memory`: tools/memory.cpp.
void add_memory_command(CLI::App& app);
/// `slimgrad bench step`: tools/bench_step.cpp.
void add_bench_step_command(CLI::App& bench);
}  // namespace slimgrad::tools

namespace {

/// Prints "slimgrad: error: <message>" as exactly one line (the library's messages start with
/// "slimgrad: "; CLI11's may span lines).
void print_error(std::string message) {
  if (message.rfind("slimgrad: ", 0) == 0) message.erase(0, 10);
  for (char& ch : message)
    if (ch == '\n' || ch == '\r') ch = ' ';
  while (!message.empty() && message.back() == ' ')
    message.pop_back();
  std::fprintf(stderr, "slimgrad: error: %s\n", message.c_str());
}

/// CLI11 reports a misspelt or missing command as "A subcommand is required"; name it
/// instead. Returns the problem, or "" when the command words are fine (or CLI11's business).
std::string check_command_words(CLI::App& app, int argc, char** argv) {
  CLI::App* current = &app;
  std::string path = "slimgrad";
  for (int i = 1;; ++i) {
    auto subs = current->get_subcommands([](CLI::App*) { return true; });
    if (subs.empty()) return "";
    std::string names;
    for (CLI::App* s : subs)
      names += (names.empty() ? "" : ", ") + s->get_name();
    if (i >= argc) return "'" + path + "' needs a command: " + names;
    const std::string word = argv[i];
    if (!word.empty() && word[0] == '-') return "";  // --help, --version, or CLI11's error
    CLI::App* next = nullptr;
    for (CLI::App* s : subs)
      if (s->get_name() == word) next = s;
    if (!next) return "unknown command '" + word + "' for '" + path + "' (expected " + names + ")";
    current = next;
    path += " " + word;
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "slimgrad: memory-efficient training tools (wavelet transforms of gradients, optimizer "
      "replay, memory accounting, benchmarks)",
      "slimgrad"};
  app.set_version_flag("--version", std::string("slimgrad ") +
                                        std::to_string(SLIMGRAD_VERSION_MAJOR) + "." +
                                        std::to_string(SLIMGRAD_VERSION_MINOR) + "." +
                                        std::to_string(SLIMGRAD_VERSION_PATCH));
  app.require_subcommand(1);
  app.footer("Run 'slimgrad <command> --help' for a command's options.");

  slimgrad::tools::add_transform_command(app);
  CLI::App& bench = slimgrad::tools::add_bench_command(app);
  slimgrad::tools::add_bench_transform_command(bench);
  bench.description("Microbenchmarks of slimgrad's transforms and optimizer steps");
  slimgrad::tools::add_bench_step_command(bench);
  slimgrad::tools::add_replay_command(app);
  slimgrad::tools::add_memory_command(app);

  if (std::string problem = check_command_words(app, argc, argv); !problem.empty()) {
    print_error(problem);
    return 2;
  }
  try {
    app.parse(argc, argv);  // runs the chosen subcommand's callback
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help, --version
  } catch (const CLI::ParseError& e) {
    print_error(e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    print_error("out of memory");
    return 1;
  } catch (const std::exception& e) {
    print_error(e.what());
    return 1;
  }
  return 0;
}
