// slimgrad — command-line tool (subcommands are added by their issues).
#include <cstdio>

int main() {
  std::puts("slimgrad 0.1.0");
  return 0;
}
