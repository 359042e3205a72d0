// Command dockerfilecheck parses a Dockerfile with BuildKit's Dockerfile frontend (the parser
// and instruction checks `docker build` uses) and runs its build-check rules (the ones
// `docker build --check` reports at parse time). No Docker engine is needed.
//
//	dockerfilecheck [--json] Dockerfile
//
// Exit 0 when the file parses with no warning, 1 otherwise (each warning printed with its rule
// and line). With --json, prints the stages (base, user, entrypoint, copies) for tests.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

type warning struct {
	Rule    string `json:"rule"`
	Message string `json:"message"`
	Line    int    `json:"line"`
}

type copyOut struct {
	Sources []string `json:"sources"`
	Dest    string   `json:"dest"`
	From    string   `json:"from,omitempty"`
}

type stageOut struct {
	Name       string    `json:"name"`
	Base       string    `json:"base"`
	User       string    `json:"user,omitempty"`
	Entrypoint []string  `json:"entrypoint,omitempty"`
	ShellForm  bool      `json:"entrypoint_shell_form,omitempty"`
	Cmd        []string  `json:"cmd,omitempty"`
	Env        []string  `json:"env,omitempty"`
	Copies     []copyOut `json:"copies"`
	Runs       int       `json:"runs"`
}

type report struct {
	File     string            `json:"file"`
	MetaArgs map[string]string `json:"meta_args"`
	Stages   []stageOut        `json:"stages"`
	Warnings []warning         `json:"warnings"`
}

func main() {
	asJSON := flag.Bool("json", false, "print the parsed stages as JSON")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: dockerfilecheck [--json] Dockerfile")
		os.Exit(2)
	}
	rep, err := check(flag.Arg(0))
	if err != nil {
		fmt.Fprintf(os.Stderr, "dockerfilecheck: invalid: %v\n", err)
		os.Exit(1)
	}
	if *asJSON {
		out, _ := json.MarshalIndent(rep, "", "  ")
		fmt.Println(string(out))
	}
	for _, w := range rep.Warnings {
		fmt.Fprintf(os.Stderr, "dockerfilecheck: %s:%d: %s: %s\n", rep.File, w.Line, w.Rule, w.Message)
	}
	if len(rep.Warnings) > 0 {
		os.Exit(1)
	}
	if !*asJSON {
		fmt.Printf("dockerfilecheck: %s valid (%d stages, no build-check warning)\n", rep.File, len(rep.Stages))
	}
}

func check(path string) (*report, error) {
	dt, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	rep := &report{File: path, MetaArgs: map[string]string{}, Stages: []stageOut{}, Warnings: []warning{}}
	res, err := parser.Parse(bytes.NewReader(dt))
	if err != nil {
		return nil, err
	}
	for _, w := range res.Warnings {
		rep.Warnings = append(rep.Warnings, warning{"parser", w.Short, line(w.Location)})
	}
	lint := linter.New(&linter.Config{
		Warn: func(rule, _ string, _ string, msg string, loc []parser.Range) {
			rep.Warnings = append(rep.Warnings, warning{rule, msg, lineOf(loc)})
		},
	})
	stages, metaArgs, err := instructions.Parse(res.AST, lint)
	if err != nil {
		return nil, err
	}
	for _, a := range metaArgs {
		for _, kv := range a.Args {
			v := ""
			if kv.Value != nil {
				v = *kv.Value
			}
			rep.MetaArgs[kv.Key] = v
		}
	}
	for _, st := range stages {
		out := stageOut{Name: st.Name, Base: st.BaseName, Copies: []copyOut{}}
		for _, c := range st.Commands {
			switch cmd := c.(type) {
			case *instructions.UserCommand:
				out.User = cmd.User
			case *instructions.EntrypointCommand:
				out.Entrypoint, out.ShellForm = cmd.CmdLine, cmd.PrependShell
			case *instructions.CmdCommand:
				out.Cmd = cmd.CmdLine
			case *instructions.EnvCommand:
				for _, kv := range cmd.Env {
					out.Env = append(out.Env, kv.Key+"="+kv.Value)
				}
			case *instructions.CopyCommand:
				out.Copies = append(out.Copies, copyOut{cmd.SourcePaths, cmd.DestPath, cmd.From})
			case *instructions.RunCommand:
				out.Runs++
			}
		}
		rep.Stages = append(rep.Stages, out)
	}
	return rep, nil
}

func lineOf(loc []parser.Range) int {
	if len(loc) == 0 {
		return 0
	}
	return loc[0].Start.Line
}

func line(loc *parser.Range) int {
	if loc == nil {
		return 0
	}
	return loc.Start.Line
}
