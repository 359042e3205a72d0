// Command composecheck loads docker-compose files the way `docker compose config` does, with the
// Compose Specification's reference loader (compose-go): YAML parsing, JSON-schema validation,
// variable interpolation (including ${VAR:?message} errors), normalization and the consistency
// checks (depends_on targets, networks, volumes). No Docker engine is needed.
//
//	composecheck [--env-file FILE]... [--project-dir DIR] [--json] FILE...
//
// Exit status 0 when the files form a valid project, 1 with the loader's message otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	var envFiles stringList
	flag.Var(&envFiles, "env-file", "environment file used for interpolation (repeatable)")
	projectDir := flag.String("project-dir", "", "project directory (default: the first file's folder)")
	asJSON := flag.Bool("json", false, "print the resolved project as JSON (like `docker compose config --format json`)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: composecheck [--env-file FILE]... [--project-dir DIR] [--json] FILE...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(flag.Args(), envFiles, *projectDir, *asJSON); err != nil {
		fmt.Fprintf(os.Stderr, "composecheck: invalid: %v\n", err)
		os.Exit(1)
	}
}

func run(files []string, envFiles []string, projectDir string, asJSON bool) error {
	opts := []cli.ProjectOptionsFn{cli.WithOsEnv}
	if projectDir != "" {
		opts = append(opts, cli.WithWorkingDirectory(projectDir))
	}
	if len(envFiles) > 0 {
		opts = append(opts, cli.WithEnvFiles(envFiles...))
	}
	// WithDotEnv reads the env files (or the project's .env) into the interpolation environment.
	opts = append(opts, cli.WithDotEnv)
	options, err := cli.NewProjectOptions(files, opts...)
	if err != nil {
		return err
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		return err
	}
	if asJSON {
		out, err := project.MarshalJSON()
		if err != nil {
			return err
		}
		fmt.Println(string(out))
		return nil
	}
	names := project.ServiceNames()
	sort.Strings(names)
	fmt.Printf("composecheck: %s valid (project %q, %d services: %s)\n",
		strings.Join(files, ", "), project.Name, len(names), strings.Join(names, ", "))
	return nil
}
